"""The emulated hypervisor: domains, memory, grant tables, event channels, domain links."""
