"""The accuracy-vs-GFLOPs tool's table, plot and sweep (no model is run here)."""

from PIL import Image

from vit_jax.tools import token_reduction_accuracy as tool


def test_sweep_table_and_plot(tmp_path):
  sweep = tool.sweep([0, 4, 8], [1.0, 0.5])
  assert [(s, o) for s, _, o in sweep] == [
      ("plain", {}), ("ToMe (no retraining)", {"token_merging": 4}),
      ("ToMe (no retraining)", {"token_merging": 8}),
      ("EViT (no retraining)", {"token_keep_rate": 0.5})]
  points = [tool.Point("ToMe (no retraining)", "plain", 0.02, 0.98, "65, 65"),
            tool.Point("ToMe (no retraining)", "ToMe r=8", 0.012, 0.9),
            tool.Point("EViT (no retraining)", "EViT keep=0.5", 0.011, 0.85),
            tool.Point(tool.TRAINED, "ToMe r=8 trained", 0.012, 0.95)]
  table = tool.markdown(points).splitlines()
  assert len(table) == 2 + 4
  assert table[2] == "| ToMe (no retraining) | plain | 65, 65 | 0.0200 | 98.00% |"
  png = tmp_path / "plot.png"
  tool.plot(points, str(png))
  image = Image.open(png)
  assert image.size == (720, 480)
  # Something was drawn in each series' colour.
  colours = {c for _, c in image.getcolors(maxcolors=1 << 16)}
  assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours
  doc = tmp_path / "doc.md"
  doc.write_text(f"intro\n{tool.TABLE_BEGIN}\nold\n{tool.TABLE_END}\nend\n")
  tool.write_markdown(str(doc), "new")
  assert doc.read_text() == f"intro\n{tool.TABLE_BEGIN}\nnew\n{tool.TABLE_END}\nend\n"
