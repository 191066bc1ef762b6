"""arq worker processes of sudo-queue (installed as `sudo_queue.workers`)."""
