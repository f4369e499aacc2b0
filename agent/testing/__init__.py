"""Small workload programs used by tests and demos (echo server, client); not part of the agent."""
