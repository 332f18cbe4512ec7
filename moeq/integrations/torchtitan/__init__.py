"""torchtitan: adapters for its experts modules (the config-time converter users import is
``moeq.torchtitan``). Nothing here imports torchtitan at module import."""
