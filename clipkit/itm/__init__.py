"""Image-text matching (ITM): heads over the two towers' token states (`heads`), in-batch hard negatives
(`sampler`) and the towers' token states (`states`).

As in ALBEF/BLIP: the caption's token states pass a few fusion layers (self-attention over the text,
cross-attention to the image's patch tokens, feed-forward); a linear layer on the first token says
match / no match. Training pairs per batch: the B positives, plus for each caption one hard-negative
image and for each image one hard-negative caption, drawn in proportion to the softmax of their
contrastive similarity, never from the same image.
"""

from clipkit.itm.heads import (FusionLayer, ITMHead, LateInteractionHead, PixelStem, build_head_from_config,
                               build_itm_head, match_scores, require_itm, rerank_weight)
from clipkit.itm.sampler import itm_logits_and_labels, sample_hard_negatives
from clipkit.itm.states import (encode_image_tokens, encode_text_tokens, exact_text_length, image_states, padding_mask,
                                text_forward, text_states, tower_widths)

__all__ = ["FusionLayer", "ITMHead", "LateInteractionHead", "PixelStem", "build_head_from_config", "build_itm_head",
           "encode_image_tokens", "encode_text_tokens", "exact_text_length", "image_states", "itm_logits_and_labels",
           "match_scores", "padding_mask", "require_itm", "rerank_weight", "sample_hard_negatives", "text_forward",
           "text_states", "tower_widths"]
