"""DINOv2 + iBOT + KoLeo pretraining for chest radiographs (the RAD-DINO recipe)."""
