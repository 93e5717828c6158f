from hetlm_jax.main import run

run()
