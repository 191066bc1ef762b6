"""Approval channels and agent-framework adapters (installed as `sudo_queue.adapters`)."""
