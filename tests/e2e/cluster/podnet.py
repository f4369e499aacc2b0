"""Pod networking on one node: address allocation and the pod's namespace wired to the node, Calico style.

A pod gets its own network namespace with `eth0` holding its IP as a /32 and a default route via
the link-local gateway 169.254.1.1. The node's end of the veth has no address; proxy ARP answers
for the gateway, and a /32 route on the node points at the veth. So everything a pod sends enters
the node's stack from that veth (where the agent's prerouting TPROXY rules see it) and is routed,
never bridged.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.cluster import netns
from tests.e2e.cluster.layout import POD_GATEWAY, Layout, NodeLayout


class AddressPoolExhausted(RuntimeError):
    """Every address of the node's pod CIDR is in use."""


class AddressPool:
    """The node's pod CIDR; hands out the lowest free address, so a freed address is reused first."""

    def __init__(self, cidr: str) -> None:
        network = ipaddress.IPv4Network(cidr)
        # .1 stays free as the conventional node-side address of the range.
        self._candidates = [str(a) for a in list(network.hosts())[1:]]
        self._used: set[str] = set()

    def allocate(self) -> str:
        for address in self._candidates:
            if address not in self._used:
                self._used.add(address)
                return address
        raise AddressPoolExhausted(f"no free pod address left in {self._candidates[0]}..")

    def release(self, address: str) -> None:
        self._used.discard(address)


@dataclass(frozen=True)
class Sandbox:
    """Where a pod's processes run: its namespace (None: the node's, for hostNetwork) and its IP."""

    netns: str | None
    ip: str
    host_veth: str | None


def host_veth_name(uid: str) -> str:
    """The node-side interface of a pod (15 characters at most, stable for the pod's UID)."""
    return "veth" + hashlib.sha256(uid.encode()).hexdigest()[:11]


class PodNetwork:
    """Creates and removes pod sandboxes on one node. Blocking: callers run it off the event loop."""

    def __init__(self, layout: Layout, node: NodeLayout) -> None:
        self._layout = layout
        self._node = node
        self._pool = AddressPool(node.pod_cidr)

    def host_sandbox(self) -> Sandbox:
        """The node's own namespace, for hostNetwork pods."""
        return Sandbox(netns=None, ip=self._node.ip, host_veth=None)

    def attach(self, namespace: str, name: str, uid: str) -> Sandbox:
        """A fresh namespace for the pod with the next free address, reachable from every node."""
        pod_netns = self._layout.pod_netns(namespace, name, uid)
        address = self._pool.allocate()
        veth = host_veth_name(uid)
        try:
            if netns.exists(pod_netns):  # left by a pod of the same name whose teardown was cut short
                netns.kill_all_in([pod_netns])
                netns.delete(pod_netns)
            netns.create(pod_netns)
            netns.ip_batch(
                self._node.netns,
                [f"link add {veth} type veth peer name eth0 netns {pod_netns}", f"link set {veth} up"],
            )
            # The kubelet runs in the node's namespace, where /proc/sys/net is the node's.
            Path(f"/proc/sys/net/ipv4/conf/{veth}/proxy_arp").write_text("1")
            Path(f"/proc/sys/net/ipv4/neigh/{veth}/proxy_delay").write_text("0")
            netns.ip_batch(self._node.netns, [f"route add {address}/32 dev {veth} scope link"])
            netns.ip_batch(
                pod_netns,
                [
                    f"addr add {address}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {POD_GATEWAY} dev eth0 scope link",
                    f"route add default via {POD_GATEWAY} dev eth0",
                ],
            )
        except Exception:
            netns.delete(pod_netns)
            self._pool.release(address)
            raise
        return Sandbox(netns=pod_netns, ip=address, host_veth=veth)

    def detach(self, sandbox: Sandbox) -> None:
        """Kills what is left in the pod's namespace, deletes it (and its veth) and frees the address."""
        if sandbox.netns is None:
            return
        netns.kill_all_in([sandbox.netns])
        netns.delete(sandbox.netns)
        self._pool.release(sandbox.ip)
