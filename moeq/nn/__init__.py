"""nn.Modules: the top-k router, ``GroupedExperts``, ``MoE`` and the demo transformer."""
