"""The private descriptor pool every pyserve stub registers its file in (see tools/gen_protos.py)."""

from google.protobuf import descriptor_pool as _descriptor_pool

POOL = _descriptor_pool.DescriptorPool()
