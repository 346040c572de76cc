"""Cheating peers built on the real peer code (tests/adversaries/peer.py); each is caught by the coordinator."""
