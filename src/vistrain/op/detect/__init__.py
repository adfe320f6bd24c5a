"""Detection operators: YOLOX backbone, neck, head, SimOTA assigner and loss."""
