"""Reading and writing checkpoints: the safetensors format in one place (:mod:`.safetensors_format`: dtype
names, header encoding and padding, positioned reads and writes), used by the lazy checkpoint reader
(:mod:`.loading`), the streaming sharded writer (:mod:`.writer`) and the teacher cache
(:mod:`divmerge_core.learned.teacher_cache`)."""
