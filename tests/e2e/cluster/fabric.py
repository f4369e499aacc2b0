"""The cluster's network: control-plane namespace with the bridge, node namespaces, the root link.

    root ns: <prefix>-api 10.201.x.y/30 ──veth── api (cp ns)
    cp ns:   br0 10.99.0.1/24 ── port<i> ──veth── eth0 10.99.0.1<i>/24 (<prefix>-node-<i>)

The bridge lives in the control-plane namespace, so the root namespace holds nothing but its end of
the /30 to the API server. The control plane does not forward, so nodes and pods cannot reach the
root namespace. Nodes forward between their pods and route the other nodes' pod CIDRs through the
owning node's fabric address.
"""

from __future__ import annotations

import ipaddress
import shutil
import zlib
from pathlib import Path

from tests.e2e.cluster import netns
from tests.e2e.cluster.layout import CONTROL_PLANE_IP, FABRIC, ROOT_LINK_RANGE, Layout

_BRIDGE = "br0"
_CONTROL_PLANE_LINK = "api"

NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
"""Forwarding between pods; no reverse-path filter, since TPROXY-delivered replies break it."""


class FabricError(RuntimeError):
    """The cluster's network cannot be built (the message says why and what to do)."""


def choose_root_link(prefix: str) -> ipaddress.IPv4Network:
    """A /30 for the root link, from a hash of the prefix, skipping ranges the root namespace uses."""
    used = [
        ipaddress.ip_interface(word).network
        for line in netns.ip(None, "-4", "-o", "addr", "show").stdout.splitlines()
        for word in line.split()[3:4]
    ]
    used += [
        ipaddress.ip_network(line.split()[0])
        for line in netns.ip(None, "-4", "route", "show").stdout.splitlines()
        if line and line.split()[0][0].isdigit()
    ]
    subnets = list(ROOT_LINK_RANGE.subnets(new_prefix=30))
    start = zlib.crc32(prefix.encode()) % len(subnets)
    for offset in range(len(subnets)):
        candidate = subnets[(start + offset) % len(subnets)]
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise FabricError(f"no free /30 in {ROOT_LINK_RANGE} for the root link")


def root_link_addresses(link: ipaddress.IPv4Network) -> tuple[str, str]:
    """(root end, control-plane end) of the root link."""
    first, second = list(link.hosts())
    return str(first), str(second)


def build(layout: Layout, root_link: ipaddress.IPv4Network) -> None:
    """Creates every namespace and link of the cluster (nothing of it may exist yet)."""
    cp = layout.control_plane_netns
    root_ip, cp_link_ip = root_link_addresses(root_link)
    netns.create(cp)
    fabric_len = FABRIC.prefixlen
    netns.ip(
        None, *f"link add {layout.root_link} type veth peer name {_CONTROL_PLANE_LINK} netns {cp}".split()
    )
    # Only the IPv4 /30 belongs in the root namespace: no IPv6 link-local address, no router solicitations.
    Path(f"/proc/sys/net/ipv6/conf/{layout.root_link}/disable_ipv6").write_text("1")
    netns.ip_batch(None, [f"addr add {root_ip}/30 dev {layout.root_link}", f"link set {layout.root_link} up"])
    commands = [
        f"link add {_BRIDGE} type bridge",
        f"addr add {CONTROL_PLANE_IP}/{fabric_len} dev {_BRIDGE}",
        f"link set {_BRIDGE} up",
        f"addr add {cp_link_ip}/30 dev {_CONTROL_PLANE_LINK}",
        f"link set {_CONTROL_PLANE_LINK} up",
    ]
    nodes = layout.nodes
    for node in nodes:
        netns.create(node.netns)
        netns.sysctl(node.netns, NODE_SYSCTLS)
        commands += [
            f"link add {node.fabric_port} type veth peer name eth0 netns {node.netns}",
            f"link set {node.fabric_port} master {_BRIDGE}",
            f"link set {node.fabric_port} up",
        ]
    # Replies from the API server to pods (in-cluster clients) go back through the pod's node.
    commands += [f"route add {node.pod_cidr} via {node.ip}" for node in nodes]
    netns.ip_batch(cp, commands)
    for node in nodes:
        node_commands = [
            f"addr add {node.ip}/{fabric_len} dev eth0",
            "link set eth0 up",
            f"route add default via {CONTROL_PLANE_IP}",
        ]
        node_commands += [f"route add {peer.pod_cidr} via {peer.ip}" for peer in nodes if peer is not node]
        netns.ip_batch(node.netns, node_commands)


def leftovers(layout: Layout) -> list[str]:
    """What of this prefix exists on the machine: namespaces, root links, etcd data."""
    found = netns.list_with_prefix(layout.netns_prefix)
    links = netns.ip(None, "-o", "link", "show").stdout.splitlines()
    found += [
        name
        for line in links
        if (name := line.split(":")[1].strip().split("@")[0]).startswith(layout.netns_prefix)
    ]
    if layout.etcd_data_dir.exists():
        found.append(str(layout.etcd_data_dir))
    return found


def teardown(layout: Layout) -> None:
    """Kills every process in the cluster's namespaces and deletes the namespaces, links and data."""
    namespaces = netns.list_with_prefix(layout.netns_prefix)
    netns.kill_all_in(namespaces)
    for name in namespaces:
        netns.delete(name)
    for leftover in leftovers(layout):
        if leftover.startswith(layout.netns_prefix):
            netns.ip(None, "link", "delete", leftover, check=False)
    shutil.rmtree(layout.etcd_data_dir, ignore_errors=True)
