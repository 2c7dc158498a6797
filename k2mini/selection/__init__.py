"""Which layers and experts a reduced checkpoint keeps: selectors and the Plan they produce."""
