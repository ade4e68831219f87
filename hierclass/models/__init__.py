"""Models: the timm backbone factory (backbone.py) and the router / expert / flat heads (heads.py)."""
