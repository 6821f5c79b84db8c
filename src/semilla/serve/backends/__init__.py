"""Every way of answering behind one interface: the local engine, remote services, fallback chains."""
