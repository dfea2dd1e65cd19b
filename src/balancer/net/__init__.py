"""Sockets: listeners, event loops, loop detection, descriptor budget."""
