"""Operators: box geometry and detection building blocks (plain torch, no torchvision)."""
