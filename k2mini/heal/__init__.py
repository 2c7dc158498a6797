"""Healing a reduced checkpoint by distillation from the cached teacher (``k2mini heal``)."""
