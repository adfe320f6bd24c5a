"""Shared pytest setup: keeps CPU tests single-threaded and deterministic."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
