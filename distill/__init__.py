"""Distillation of the shared policy into small students (arrives with the distillation issue)."""
