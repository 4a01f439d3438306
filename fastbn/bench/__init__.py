"""fastbn's benchmarks: the speed table of ``python -m fastbn`` (:mod:`.cli`, :mod:`.table`,
:mod:`.case`, :mod:`.timing`, :mod:`.caffe`, :mod:`.plot`) and the synchronized Batch
Normalization benchmark of ``python -m fastbn.distributed --bench`` (:mod:`.distributed`).

They measure the library from outside, through its public functions (and the kernels'
read and copy passes, the memory system's yardsticks); the library never imports them.
"""
