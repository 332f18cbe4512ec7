"""Expert parallelism on torch.distributed (DeviceMesh "ep" dim, DTensor experts, all-to-all dispatch).

See docs/expert_parallel.md.
"""
from moeq.parallel.expert_parallel import EP_DIM, ExpertParallelDispatcher, ShardedGroupedExperts, apply_expert_parallel

__all__ = ["EP_DIM", "ExpertParallelDispatcher", "ShardedGroupedExperts", "apply_expert_parallel"]
