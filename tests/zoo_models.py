"""One small configuration of every registered model family, for the whole-zoo tests
(``test_zoo.py``, and the tensor-parallel rules in ``test_sharding.py``).

A new family adds its line here; ``test_zoo`` fails until it does.
"""

# family -> (model, overrides, image side, a per-stage setting one entry short or None).
ZOO = {
    "vit": ("vit_tiny_patch16_224", dict(image_size=32, patch_size=8, hidden_size=32,
                                         num_layers=2, num_heads=4, mlp_dim=64), 32, None),
    "deit": ("deit_tiny_distilled_patch16_224",
             dict(image_size=32, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64),
             32, None),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(image_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                  window_size=4), 32, ("num_heads", (2,))),
    "maxvit": ("maxvit_tiny_tf_224",
               dict(image_size=32, window_size=2, stem_width=8, embed_dims=(16, 32),
                    depths=(1, 1), dim_head=8, head_hidden_size=16), 32,
               ("embed_dims", (16,))),
    "gcvit": ("gcvit_xxtiny",
              dict(image_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                   window_ratios=(8, 8), mlp_ratio=2.0, layer_scale=0.5), 32,
              ("window_ratios", (8,))),
    "pvt": ("pvt_tiny", dict(image_size=32, depths=(1, 1), embed_dims=(16, 32),
                             num_heads=(1, 2), sr_ratios=(2, 1), mlp_ratios=(4, 4)), 32,
            ("sr_ratios", (2,))),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1), embed_dims=(16, 32), num_heads=(1, 2),
                                 sr_ratios=(2, 1), mlp_ratios=(4, 4)), 32,
               ("num_heads", (1,))),
    "cswin": ("cswin_tiny_224", dict(embed_dim=16, depths=(1, 1), num_heads=(2, 2),
                                     split_sizes=(2, 1)), 32, ("split_sizes", (2,))),
    "cvt": ("cvt_13", dict(hidden_sizes=(16, 24, 32), depths=(1, 1, 1),
                           num_heads=(1, 2, 4)), 32, ("num_heads", (1, 2))),
    "crossvit": ("crossvit_9_240",
                 dict(image_size=16, image_scale=(1.0, 0.5), patch_size=(4, 4),
                      hidden_size=(32, 48), depth=((1, 2, 0),), num_heads=(2, 2),
                      mlp_ratio=(2.0, 2.0, 1.0)), 16, None),
    "t2t_vit": ("t2t_vit_14", dict(hidden_size=32, num_layers=2, num_heads=2,
                                   token_dim=16, t2t_dropout_rate=0.0), 32, None),
    "tnt": ("tnt_s_patch16_224", dict(image_size=16, patch_size=8, hidden_size=32,
                                      inner_dim=8, num_layers=2, inner_heads=2,
                                      outer_heads=2), 16, None),
    "metaformer": ("caformer_s18",
                   dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 64),
                        token_mixers=("pooling", "sepconv", "attention", "attention")),
                   32, ("norms", ("layer",) * 3)),
    "efficientvit_mit": ("efficientvit_b0",
                         dict(widths=(8, 16, 16, 32, 32), depths=(0, 1, 1, 1, 1),
                              head_dim=8, head_widths=(32, 32), image_size=32), 32,
                         ("widths", (8, 16, 16, 32))),
    "efficientvit_msra": ("efficientvit_m0",
                          dict(embed_dims=(16, 24, 32), key_dims=(4, 4, 4),
                               depths=(1, 1, 1), num_heads=(2, 2, 2), kernels=(3, 5),
                               image_size=32), 32, ("window_sizes", (7, 7))),
    "shvit": ("shvit_s1", dict(embed_dims=(16, 24, 32), partial_dims=(8, 8, 8),
                               qk_dims=(4, 4, 4), depths=(1, 1, 1), mixers=("i", "s", "s")),
              48, ("qk_dims", (4, 4))),
}
# Two-tower models embed images and texts instead of classifying: their image tower
# is a registered image model (above), and their own surface is tested in
# test_two_tower.py. Here: dtypes, drop path and bad settings.
TWO_TOWER = ("clip_vit_base_patch32_224",
             dict(image_model="vit_tiny_patch16_224", embed_dim=16,
                  image=dict(image_size=16, patch_size=8, hidden_size=32, num_layers=2,
                             num_heads=4, mlp_dim=64),
                  text=dict(vocab_size=50, context_length=8, hidden_size=32, num_layers=2,
                            num_heads=4, mlp_dim=64)))
