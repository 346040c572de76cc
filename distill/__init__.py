"""Distillation of the shared policy into small students: DAgger training, actors, signed checkpoint packages,
hivegym-pull and hivegym-play."""
