from longvid_jax import xla_flags


def test_apply_defaults_adds_missing_flags_and_keeps_the_users():
    env = {}
    assert xla_flags.apply_defaults(env) == "--xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    flags = xla_flags.apply_defaults(env).split()
    assert flags == ["--xla_force_host_platform_device_count=8",
                     "--xla_gpu_enable_triton_gemm=false"]
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    assert xla_flags.apply_defaults(env) == "--xla_gpu_enable_triton_gemm=true"
    assert xla_flags.apply_defaults(env) == "--xla_gpu_enable_triton_gemm=true"  # idempotent
