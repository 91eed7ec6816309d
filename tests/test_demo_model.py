"""The bundled demo model is a real MTP model: loads through the same path as any checkpoint, and on held-out
standard-library code its greedy tau at k = 1 is at least 1.6 (README), with output equal to plain decoding."""

import mlxmtp
from mlxmtp import generation
from mlxmtp.bench import stdlib_code_suite

MAX_TOKENS = 48


def test_demo_model_is_a_real_mtp_model():
    path = mlxmtp.demo_model_path()
    model, tokenizer = mlxmtp.load(path)
    assert model.load_report["model_type"] == "deepseek_v3" and model.num_mtp_modules == 1
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    prompts = stdlib_code_suite(path / "heldout_files.txt", n=12)
    accepted = forwards = 0
    for item in prompts:
        plain = generation.generate(model, tokenizer, item["prompt"], max_tokens=MAX_TOKENS, draft_tokens=0)
        mtp = generation.generate(model, tokenizer, item["prompt"], max_tokens=MAX_TOKENS, draft_tokens=1)
        assert mtp.tokens == plain.tokens, item["id"]
        accepted += mtp.stats.accepted
        forwards += mtp.stats.target_forwards
    tau = 1 + accepted / forwards
    assert tau >= 1.6, f"held-out greedy tau at k=1 is {tau:.3f}"
