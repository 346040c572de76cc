"""The contract between peers and the coordinator: config, wire messages, policy, rollouts, losses."""
