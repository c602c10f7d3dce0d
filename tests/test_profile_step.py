"""The per-op profile tool reads XLA's op events from a real trace of a benchmark step."""

from vit_jax.tools import profile_step


def test_profile_names_the_ops_of_a_train_step_with_their_hlo():
  seconds, times, hlo_text, _ = profile_step.profile(
      "vit_tiny_patch16_224", "train", batch=2, overrides={"image_size": 32},
      warmup=1, steps=1)
  assert seconds > 0 and times, "the trace held no XLA op events"
  lines = profile_step.hlo_lines(hlo_text)
  # Every traced op is an instruction of the compiled module (so the report can show it).
  assert sum(op in lines for op in times) >= 0.9 * len(times)
  kinds = dict(profile_step.by_kind(times))
  assert abs(sum(kinds.values()) - sum(times.values())) < 1e-6
  text = profile_step.report(seconds, times, hlo_text, top=5)
  assert "by kind:" in text and text.count("%  ") >= 5
