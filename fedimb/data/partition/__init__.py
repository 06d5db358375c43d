"""Non-IID partitions of a labelled training set across federated clients.

Every partitioner is a pure function of the integer ``labels`` and an
``np.random.Generator``: the same seed gives the same split, and nothing reads a global
RNG. Each returns one sorted index array per client; the arrays are disjoint and cover
every sample (``label_skew`` is the one exception: a class no client drew is left out).

Partitioners (names in :data:`PARTITIONERS`):

- ``"label-skew"``: ``#C=k`` of NIID-Bench (Li et al., 2022), each client holds exactly
  ``k`` classes;
- ``"shards"``: McMahan et al. (2017), sort by label and deal equal shards;
- ``"dirichlet"``: per-class client proportions drawn from ``Dir(alpha)``, NIID-Bench's
  ``noniid-labeldir`` (``balance``: a client holding its share takes no more classes);
- ``"dirichlet-equal"``: Dirichlet skew among equal-size clients, FedDF's split as the
  federated long-tail papers use it (CReFF);
- ``"iid"``: a uniform random split.

:func:`long_tail` builds a globally long-tailed subset (CIFAR-10-LT style, Cao et al.
2019) before partitioning; :func:`keep_fractions`, a subset with a keep fraction per
class (imbalanced IMDB).

Modules: :mod:`~fedimb.data.partition.core` (the registry, :func:`partition`, checks),
:mod:`~fedimb.data.partition.sharding` and :mod:`~fedimb.data.partition.proportions`
(the built-in partitioners), :mod:`~fedimb.data.partition.longtail` (global imbalance).
"""

from fedimb.data.partition.core import (
    PARTITIONERS,
    Partitioner,
    check_labels,
    checked_indices,
    class_counts,
    partition,
    partition_params,
)
from fedimb.data.partition.longtail import (
    LONG_TAIL_PROFILES,
    keep_fractions,
    long_tail,
    long_tail_counts,
)
from fedimb.data.partition.proportions import dirichlet, dirichlet_equal
from fedimb.data.partition.sharding import iid, label_skew, shards

__all__ = [
    "LONG_TAIL_PROFILES",
    "PARTITIONERS",
    "Partitioner",
    "check_labels",
    "checked_indices",
    "class_counts",
    "dirichlet",
    "dirichlet_equal",
    "iid",
    "keep_fractions",
    "label_skew",
    "long_tail",
    "long_tail_counts",
    "partition",
    "partition_params",
    "shards",
]
