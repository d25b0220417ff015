"""Other libraries' APIs on top of distload's own: `accelerate` (device maps, dispatch)."""
