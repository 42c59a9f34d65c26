"""GoldiCLIP (paper sec. 3, fig. 1): composes the towers, pooling, the four losses and their weighting.

    L = UncertaintyWeighting(L_ret (sec. 3.1), L_cap, L_ref, L_grd, L_vqa (sec. 3.3), L_sd (sec. 3.2))

The training batch `forward` takes (B images on this process, K captions each):

    images               uint8 (B, 3, H, W)      the view scored by L_ret and read by the decoder;
                                                 decoder boxes are relative to this view
    caption_ids          long  (B, K, T)         BOS caption EOS, right-padded (T <= context length);
                                                 no attention mask: the text encoder is causal
    global_views         uint8 (B, G, 3, H, W)   distillation only: G global crops (teacher + student)
    local_views          uint8 (B, L, 3, h, w)   distillation only: L local crops (student); may be left
                                                 out (L = 0): the students are then the G global views,
                                                 each paired with the teacher's other globals (G >= 2)
                                                 (pixels 0-255, normalised on the device with the config's
                                                 mean/std; float views are taken as already normalised)
    decoder_input_ids    long  (M, S)            decoder only, from `tasks.build_decoder_batch`:
    decoder_labels       long  (M, S)              BOS prompt target EOS; labels = next token on target
                                                   positions, -100 elsewhere;
    decoder_image_index  long  (M,)                the row of `images` each sample describes;
    decoder_task         long  (M,)                index into `tasks.TASKS` (cap, ref, grd, vqa).
                                                 Leave the four keys out when M = 0. Rows without
                                                 a target label are padding: no loss, no count.

`config.memory` (`MemoryConfig`) trades compute for memory without changing any loss: block
checkpointing of the towers and the decoder, the pooling and the DINO heads in chunks of images.

`forward` returns (total loss, metrics): detached scalar tensors named `loss/<name>`,
`log_var/<name>`, `weight/<name>` (see `weighting.py`) plus the retrieval and distillation
parts, the logit scale and bias, and the distillation health per branch (`sd_ta/teacher_entropy_frac`,
`sd_ta/teacher_batch_entropy_frac`, `sd_ta/kl`, `sd_ta/center_norm`, the same for `sd_tc`). Around each optimiser step: before it
`drop_frozen_gradients(step)`, after it `clamp_parameters()` and `update_teacher()`.

Evaluation: `encode_image`, `encode_text`, and `score`/`score_features`, which return a
(num_texts, num_images) matrix of cosine similarities, text-conditioned (FLAIR: cos(pool(t,
V_loc), t)) or text-agnostic (cos(v_g, t)).
"""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import GoldiCLIPConfig
from .decoder import IGNORE_INDEX, MultiTaskDecoder, token_nll
from .distill import DINOHead, DistillationLoss, EMATeacher, distillation_health, ema_momentum
from .memory import in_image_chunks
from .pooling import TextConditionedPooling
from .retrieval import (SigmoidRetrievalLoss, gather_no_grad, gather_with_grad, pooled_cosine, sample_caption_index,
                        world_info)
from .tasks import TASKS
from .towers import TextTower, VisionTower, export_hf_clip, load_hf_clip_towers
from .weighting import UncertaintyWeighting

POOLING_FILE = "text_conditioned_pooling.pt"
CONFIG_FILE = "goldiclip_config.json"


class GoldiCLIP(nn.Module):
    def __init__(self, config: GoldiCLIPConfig):
        super().__init__()
        self.config = config
        embed_dim, memory = config.embed_dim, config.memory
        self.vision = VisionTower(config.vision, embed_dim, memory.checkpoint_vision)
        self.text = TextTower(config.text, embed_dim, memory.checkpoint_text)
        self.pooling = TextConditionedPooling(config.pooling, embed_dim)
        self.retrieval_loss = SigmoidRetrievalLoss(config.retrieval)
        loss_names = ("ret",)
        if config.decoder.enabled:
            self.decoder = MultiTaskDecoder(config.decoder, config.text.width, embed_dim, config.text.vocab_size,
                                            memory.checkpoint_decoder)
            loss_names += TASKS
        if config.distill.enabled:
            head = DINOHead(config.distill, embed_dim)
            tc_head = head if config.distill.shared_head else DINOHead(config.distill, embed_dim)
            self.distill_heads = nn.ModuleDict({"ta": head, "tc": tc_head})
            self.distill_losses = nn.ModuleDict({branch: DistillationLoss(config.distill, memory.head_chunk_size)
                                                 for branch in ("ta", "tc")})
            self.register_buffer("distill_step", torch.zeros((), dtype=torch.long))
            self.reset_teacher()
            loss_names += ("sd",)
        self.weighting = UncertaintyWeighting(config.weighting, loss_names)

    # ---- encoders -------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (I, 3, H, W) -> v_g (I, D), V_loc (I, P, D); projected, not normalised."""
        return self.vision(images)

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """text_ids (N, T) -> t_g (N, D); projected, not normalised."""
        return self.text(text_ids)[0]

    @torch.no_grad()
    def score_features(self, texts: torch.Tensor, image_global: torch.Tensor, image_patches: torch.Tensor, *,
                       mode: str = "conditioned", attention_sink: bool | None = None) -> torch.Tensor:
        """(num_texts, num_images) cosine similarities from encoded texts and images."""
        unit_texts = F.normalize(texts, dim=-1)  # (N, D)
        if mode == "agnostic":
            return unit_texts @ F.normalize(image_global, dim=-1).T  # (N, I)
        if mode != "conditioned":
            raise ValueError(f"unknown score mode {mode!r}; choices: ['conditioned', 'agnostic']")
        chunk = self.config.score_image_chunk_size
        columns = []
        for start in range(0, image_patches.shape[0], chunk):
            pooled = self.pooling(texts, image_patches[start:start + chunk], attention_sink)  # (c, N, D)
            columns.append((F.normalize(pooled, dim=-1) * unit_texts).sum(-1))  # (c, N)
        return torch.cat(columns).T  # (N, I)

    @torch.no_grad()
    def score(self, text_ids: torch.Tensor, images: torch.Tensor, *, mode: str = "conditioned",
              attention_sink: bool | None = None) -> torch.Tensor:
        """(num_texts, num_images) cosine similarities; see `score_features`."""
        return self.score_features(self.encode_text(text_ids), *self.encode_image(images), mode=mode,
                                   attention_sink=attention_sink)

    # ---- training -------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, caption_ids = batch["images"], batch["caption_ids"]
        num_local, num_captions = caption_ids.shape[:2]
        rank, world_size = world_info()

        texts = self.text(caption_ids.flatten(0, 1))[0]  # (b*K, D)
        all_texts = gather_with_grad(texts)  # (B*K, D), B = world_size * b
        image_global, image_patches = self.vision(images)  # (b, D), (b, P, D)
        caption_index = sample_caption_index(num_images=num_local * world_size, num_captions=num_captions,
                                             first_image=rank * num_local, num_rows=num_local,
                                             device=images.device)  # (b, N), N = B + K - 1
        queries = self.pooling.project_texts(all_texts)  # (B*K, D)

        def cosine(index: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:  # (c, N), (c, P, D) -> (c, N)
            return pooled_cosine(self.pooling.attend(queries[index], patches), all_texts[index])

        retrieval = self.retrieval_loss(
            image_global=image_global,
            conditioned_cosine=in_image_chunks(cosine, self.config.memory.pooling_chunk_size, caption_index,
                                               image_patches),
            texts=all_texts, caption_index=caption_index, num_captions=num_captions, image_offset=rank * num_local,
            world_size=world_size,
        )
        losses, present = {"ret": retrieval["ret"]}, {}
        extra = {"loss/ret_tc": retrieval["ret_tc"].detach(), "loss/ret_ta": retrieval["ret_ta"].detach(),
                 "logit_scale": self.retrieval_loss.scale().detach(), "logit_bias": self.retrieval_loss.bias.detach()}

        if self.config.decoder.enabled:
            if "decoder_input_ids" in batch:
                task_losses, present = self.decoder_losses(batch, image_global, image_patches)
            else:
                task_losses, present = self.absent_decoder_losses(images.device)
            losses.update(task_losses)
        if self.config.distill.enabled:
            distill, health = self.distillation_losses(batch, queries, caption_ids, caption_index)
            losses["sd"] = distill["sd_ta"] + distill["sd_tc"]
            extra.update({f"loss/{name}": value.detach() for name, value in distill.items()} | health)

        total, metrics = self.weighting(losses, present)
        return total, metrics | extra

    def decoder_losses(self, batch: dict[str, torch.Tensor], image_global: torch.Tensor, image_patches: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-task mean of per-sample target NLL (eq. 9), and which tasks had samples."""
        labels, task = batch["decoder_labels"], batch["decoder_task"]
        visual = torch.cat([image_global[:, None], image_patches], dim=1)  # (b, 1+P, D)
        token_states = self.text(batch["decoder_input_ids"])[1]  # (M, S, W_text)
        hidden = self.decoder(token_states, visual[batch["decoder_image_index"]])  # (M, S, W_text)
        nll = token_nll(hidden=hidden, weight=self.decoder.head_weight(self.text.token_embedding), labels=labels,
                        chunk_size=self.config.decoder.token_chunk_size)  # (M, S)
        targets = (labels != IGNORE_INDEX).sum(1)  # (M,); 0 for a padding row (static_rows)
        per_sample = nll.sum(1) / targets.clamp(min=1)  # (M,)
        sums = per_sample.new_zeros(len(TASKS)).index_add(0, task, per_sample)  # (4,)
        counts = per_sample.new_zeros(len(TASKS)).index_add(0, task, (targets > 0).to(per_sample.dtype))  # (4,)
        task_loss = sums / counts.clamp(min=1)  # (4,)
        return ({name: task_loss[i] for i, name in enumerate(TASKS)},
                {name: counts[i] > 0 for i, name in enumerate(TASKS)})

    def absent_decoder_losses(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """No decoder sample on this process: zero losses, marked absent, that still touch every decoder
        parameter, so each gets a (zero) gradient and DDP runs without its unused-parameter search."""
        touch = sum(p.sum() for p in self.decoder.parameters()) * 0.0
        absent = torch.zeros((), dtype=torch.bool, device=device)
        return {name: touch for name in TASKS}, {name: absent for name in TASKS}

    def distillation_losses(self, batch: dict[str, torch.Tensor], queries: torch.Tensor, caption_ids: torch.Tensor,
                            caption_index: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """L_sd per branch (`sd_ta`, `sd_tc`): the student sees G global + L local views (L may be 0),
        the teacher the G global; and each branch's collapse diagnostics (`sd_<branch>/<name>`, `distillation_health`).

        queries (B*K, D): the student's pooling queries of every text of the global batch.
        """
        global_views, local_views = batch["global_views"], batch.get("local_views")
        student_views = (global_views,) if local_views is None or local_views.shape[1] == 0 else (global_views,
                                                                                                     local_views)
        if global_views.shape[1] + sum(v.shape[1] for v in student_views[1:]) < 2:
            raise ValueError("self-distillation pairs each student view with the teacher's other global views: it "
                             f"needs at least 2 views, got {global_views.shape[1]} global and no local one")
        student_ta, student_tc = self._view_features(self.vision, self.pooling, student_views, queries,
                                                     caption_index)  # (b, G+L, D) each
        teacher = self.teacher.model
        with torch.no_grad():
            teacher_texts = gather_no_grad(teacher["text"](caption_ids.flatten(0, 1))[0])  # (B*K, D)
            teacher_ta, teacher_tc = self._view_features(teacher["vision"], teacher["pooling"], (global_views,),
                                                         teacher["pooling"].project_texts(teacher_texts),
                                                         caption_index)  # (b, G, D) each
        losses, health = {}, {}
        for branch, student_features, teacher_features in (("ta", student_ta, teacher_ta),
                                                           ("tc", student_tc, teacher_tc)):
            head, teacher_head, loss = self.distill_heads[branch], teacher["heads"][branch], self.distill_losses[branch]
            with torch.no_grad():
                teacher_probs = loss.teacher_probs(teacher_embed=teacher_head.embed(teacher_features),
                                                   weight=teacher_head.prototype_weight(),
                                                   step=self.distill_step)  # (b, G, P)
            losses[f"sd_{branch}"] = loss(student_embed=head.embed(student_features), weight=head.prototype_weight(),
                                          teacher_probs=teacher_probs)
            health |= {f"sd_{branch}/{name}": value for name, value in distillation_health(
                teacher_probs=teacher_probs, loss=losses[f"sd_{branch}"], center=loss.center).items()}
        return losses, health

    def _view_features(self, vision: VisionTower, pooling: TextConditionedPooling,
                       view_groups: tuple[torch.Tensor, ...], queries: torch.Tensor,
                       caption_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-agnostic v_g and caption-averaged v_tc of every view: (b, V, D) each (paper sec. 3.2).

        view_groups: tensors (b, V_i, 3, h_i, w_i), one per crop size; queries (B*K, D) from
        `pooling.project_texts`; caption_index (b, N): each image's texts.
        """

        def caption_mean(index: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:  # (c, N), (c*V, P, D) -> (c*V, D)
            # Averaging over the N captions is the paper's stability fix for small local crops.
            return pooling.attend(queries[index], patches).mean(dim=1)

        agnostic, conditioned = [], []
        for views in view_groups:
            num_images, num_views = views.shape[:2]
            view_global, view_patches = vision(views.flatten(0, 1))  # (b*V, D), (b*V, P, D)
            pooled = in_image_chunks(caption_mean, self.config.memory.pooling_chunk_size, caption_index,
                                     view_patches)  # (b*V, D)
            agnostic.append(view_global.view(num_images, num_views, -1))
            conditioned.append(pooled.view(num_images, num_views, -1))
        return torch.cat(agnostic, dim=1), torch.cat(conditioned, dim=1)

    # ---- teacher ----------------------------------------------------------------------------

    def distilled_student(self) -> nn.ModuleDict:
        """The student modules the teacher mirrors (all but the decoder and the loss parameters)."""
        return nn.ModuleDict({"vision": self.vision, "text": self.text, "pooling": self.pooling,
                              "heads": self.distill_heads})

    def reset_teacher(self) -> None:
        """Teacher := a fresh copy of the student (at init, and after loading weights)."""
        self.teacher = EMATeacher(self.distilled_student())

    # ---- around the optimiser step ----------------------------------------------------------

    def drop_frozen_gradients(self, step: int) -> None:
        """Before `optimizer.step()`: for the first `distill.freeze_last_layer_steps` steps the DINO
        heads' prototype layers get no update at all (gradients set to None, so AdamW's weight decay
        skips them too), DINO's `cancel_gradients_last_layer`: early on, the prototypes would chase
        the still-random bottleneck features."""
        if not self.config.distill.enabled or step >= self.config.distill.freeze_last_layer_steps:
            return
        for head in self.distill_heads.values():
            head.prototypes.grad = None

    def clamp_parameters(self) -> None:
        """After `optimizer.step()`: parameters that live in a range go back into it (the log logit
        scale into [0, ln 100], METHOD.md sec. 3)."""
        self.retrieval_loss.clamp_parameters()

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher; call after every `optimizer.step()`."""
        if not self.config.distill.enabled:
            return
        self.teacher.update(self.distilled_student(), ema_momentum(self.config.distill, self.distill_step))
        self.distill_step += 1

    # ---- weights in and out ---------------------------------------------------------------

    def export_pretrained(self, out_dir: str | Path) -> None:
        """Ship the student (METHOD.md sec. 8): an HF `CLIPModel` checkpoint of both towers, plus
        the pooling block and logit bias in `text_conditioned_pooling.pt` and this config as JSON."""
        out_dir = Path(out_dir)
        export_hf_clip(self.vision, self.text, self.retrieval_loss.log_scale, self.config, out_dir)
        torch.save({"pooling": self.pooling.state_dict(), "logit_bias": self.retrieval_loss.bias.detach()},
                   out_dir / POOLING_FILE)
        (out_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2))

    @classmethod
    def from_pretrained_towers(cls, name_or_path: str | Path, config: GoldiCLIPConfig) -> "GoldiCLIP":
        """A GoldiCLIP whose towers (and, from an `export_pretrained` directory, pooling) hold
        the weights of a Hugging Face CLIP checkpoint; `config` must match its shapes."""
        model = cls(config)
        log_scale = load_hf_clip_towers(name_or_path, model.vision, model.text)
        with torch.no_grad():
            model.retrieval_loss.log_scale.copy_(log_scale)
        pooling_file = Path(name_or_path) / POOLING_FILE
        if pooling_file.exists():
            saved = torch.load(pooling_file, map_location="cpu", weights_only=True)
            model.pooling.load_state_dict(saved["pooling"])
            with torch.no_grad():
                model.retrieval_loss.bias.copy_(saved["logit_bias"])
        if config.distill.enabled:
            model.reset_teacher()
        return model
