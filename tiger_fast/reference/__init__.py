"""Plain-PyTorch reference implementations: the specification of every fast path.

Each fast backend must return exactly what these return (see docs/contracts.md)."""
