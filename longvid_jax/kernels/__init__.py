"""Attention kernels and their pure-JAX references.

  flash_gpu   Pallas (Triton) flash attention: causal, segment ids, GQA; `flash_attention_ref`.
  splash_tpu  wrapper over the Pallas TPU splash attention kernel (causal, segment ids, GQA).
  ring        ring attention over a mesh axis with `jax.shard_map` (zig-zag load balancing).
  cross_entropy_gpu  Pallas (Triton) log-sum-exp and softmax-gradient passes of the chunked LM
              loss on GPU (`losses.chunked_lm_loss(impl=...)`).
  dispatch    `attention(...)`: picks one of the above, cuDNN or XLA from the platform and inputs.
"""
