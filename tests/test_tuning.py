"""The draft-depth policy behind draft_tokens="auto" (mlxmtp/tuning.py)."""

from mlxmtp.tuning import DepthPolicy

FLAT = {"verify": [1.0, 1.05, 1.1, 1.15, 1.2], "draft": 0.05}  # memory-bound: a Mac's verify curve
LINEAR = {"verify": [1.0, 2.0, 3.0, 4.0, 5.0], "draft": 0.3}  # compute-bound: the reference BLAS


def run_rounds(policy, n, accept, seconds_for):
    ks = []
    for _ in range(n):
        k = policy.choose()
        ks.append(k)
        policy.observe(k, k, sum(1 for d in range(k) if d < accept), seconds_for(k))
    return ks


def test_first_rounds_are_plain_then_drafting_pays_on_a_flat_curve():
    policy = DepthPolicy(FLAT, 4)
    ks = run_rounds(policy, 30, accept=4, seconds_for=lambda k: 0.01 * FLAT["verify"][k])
    assert ks[:3] == [0, 0, 0]
    assert ks[-1] == 4  # every draft accepted and verify nearly free: draft as deep as allowed


def test_compute_bound_curve_chooses_plain_decoding():
    policy = DepthPolicy(LINEAR, 4)
    ks = run_rounds(policy, 40, accept=1, seconds_for=lambda k: 0.01 * (LINEAR["verify"][k] + 0.3 * k))
    assert ks[-10:].count(0) >= 9  # plain, but for the occasional probe


def test_observed_round_times_override_the_measured_curve():
    """The curve says drafting is nearly free, but rounds with drafts are really slow: auto goes back to k = 0."""
    policy = DepthPolicy(FLAT, 4)
    ks = run_rounds(policy, 60, accept=1, seconds_for=lambda k: 0.01 if k == 0 else 0.05 * (1 + k))
    assert ks[-16:].count(0) >= 15


def test_low_acceptance_stops_drafting_and_probes_recover_it():
    policy = DepthPolicy(FLAT, 4, probe_every=8)
    ks = run_rounds(policy, 60, accept=0, seconds_for=lambda k: 0.01 * (1 + 0.3 * k))
    assert ks[-8:].count(0) == 7 and ks[-8:].count(1) <= 1
    ks = run_rounds(policy, 120, accept=4, seconds_for=lambda k: 0.01 * (1 + 0.01 * k))
    assert ks[-1] > 0
