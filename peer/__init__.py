"""The volunteer: hivemind swarm membership and the training loop."""
