"""Explorer behind notebooks/40_explore: free-text queries, image queries, live score weights."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .config import override
from .data import to_device
from .evaluate import evaluate_checkpoint
from .scoring import SCORING_TERMS, score_all_pairs
from .store import Store
from .text import load_backbone, tokenize


class Explorer:
    def __init__(self, cfg, checkpoint):
        ev = evaluate_checkpoint(cfg, checkpoint, progress=False)  # cached embeddings of the eval split
        self.cfg, self.split = ev["cfg"], cfg.eval.split
        self.model, self.text = ev["model"], ev["text"]
        self.img, self.cap, self.cap_img = ev["img"], ev["cap"], ev["cap_img"]
        with Store(cfg.data.store, check_values=False) as s:
            self.images = s.split_images(self.split)
            self.caption_rows = s.split_captions(self.split)
            self.captions = s.captions(self.caption_rows)
        self.tokenizer, self.backbone = load_backbone(self.cfg.data.text_model)
        self.scoring, self.last_result = self.cfg.scoring, []
        self.device = next(self.model.parameters()).device  # train.device, as evaluate_checkpoint loaded it

    @torch.no_grad()
    def encode_text(self, text: str) -> dict:
        if not text.strip():
            raise ValueError("query: empty text")
        enc = tokenize(self.tokenizer, [text], self.cfg.data.max_words)
        batch = {"text_mask": enc["attention_mask"].bool(), "word_mask": enc["words"]}
        if self.model.text.backbone is not None:  # fine-tuned backbone inside the model
            batch["input_ids"] = enc["input_ids"]
        else:
            hidden = self.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   output_hidden_states=True).hidden_states[self.cfg.data.text_layer]
            batch["text"] = hidden
        out = self.model.encode_captions(to_device(batch, self.device))
        return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}

    def set_weights(self, **weights: float) -> None:
        """New term weights by their keys (e.g. w_high=0.0); the others are kept."""
        self.scoring = override(self.scoring, weights)

    def text_query(self, text: str, k: int = 5, show: bool = True):
        cap = self.encode_text(text)
        scores = score_all_pairs(self.img, cap, self.scoring, terms=("total",), device=self.device)["total"][:, 0].numpy()
        order = np.argsort(-scores)[:k]
        self.last_result = [int(self.images[j]) for j in order]
        if show:
            from .viz import show_images
            show_images(self.cfg.data.store, self.last_result, [f"{scores[j]:.2f}" for j in order], title=text)
        return pd.DataFrame({"image": self.last_result, "score": scores[order]})

    def image_query(self, position: int, k: int = 5) -> pd.DataFrame:
        one = {key: v[position:position + 1] for key, v in self.img.items()}
        scores = score_all_pairs(one, self.cap, self.scoring, terms=("total",), device=self.device)["total"][0].numpy()
        order = np.argsort(-scores)[:k]
        return pd.DataFrame({"caption": [self.captions[c] for c in order], "score": scores[order],
                             "own image": [bool(self.cap_img[c] == position) for c in order],
                             "position": order})

    def first_caption(self, position: int) -> int:
        """Split position of the first caption of the image at split `position`."""
        return int(np.nonzero(self.cap_img == position)[0][0])

    def pair_view(self, position: int, caption: int):
        """Region-word alignment heatmap and per-band attention of (image position, caption position)."""
        from .viz import alignment_heatmap
        return alignment_heatmap(self.model, self.cfg, self.split, int(self.images[position]),
                                 int(self.caption_rows[caption]), self.text, self.scoring)

    def widget(self, query: str, k: int = 5):
        """Caption box -> top images; image picker -> top captions and the heatmap with its best
        caption; score-weight sliders re-rank both live."""
        import ipywidgets as W
        from IPython.display import display

        box = W.Text(value=query, description="caption", layout=W.Layout(width="60%"), continuous_update=False)
        pick = W.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image #")
        # learned gates (scoring.gates) can make a weight negative or fractional: the range holds it
        sliders = [W.FloatSlider(value=getattr(self.scoring, t.weight), min=-10, max=10, step=0.05,
                                 description=t.weight) for t in SCORING_TERMS]
        out_text, out_image = W.Output(), W.Output()

        def refresh(_=None):
            self.set_weights(**{s.description: s.value for s in sliders})
            with out_text:
                out_text.clear_output(wait=True)
                display(self.text_query(box.value, k))
            with out_image:
                out_image.clear_output(wait=True)
                top = self.image_query(pick.value, k)
                display(top.drop(columns="position"))
                self.pair_view(pick.value, int(top["position"].iloc[0]))
                import matplotlib.pyplot as plt
                plt.show()

        for w in (box, pick, *sliders):  # the caption box commits its value on Enter (or leaving it)
            w.observe(refresh, names="value")
        refresh()
        return W.VBox([box, W.HBox(sliders), out_text, pick, out_image])
