"""What a config implies: layer kinds, tensor shapes, parameter and byte counts."""
