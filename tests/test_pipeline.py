"""`pipeline("image-classification", model=wrapper)` returns ResMem predictions, not the base model's."""

from __future__ import annotations

import torch
from conftest import IMAGE_SIZE, NUM_LABELS, make_base, make_image_dataset
from transformers import ViTImageProcessor, pipeline

from resmem import ResMemWrapper


def test_image_classification_pipeline_uses_resmem_scores():
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    train = make_image_dataset(24, seed=0)
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=1, sigma=0.01)
    model.build_memory(train, batch_size=12, image_processor=processor)
    images = train["image"][:]
    pipe = pipeline("image-classification", model=model, image_processor=processor)
    predictions = pipe(images, top_k=NUM_LABELS)

    with torch.no_grad():
        out = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    resmem_top = out.scores.argmax(-1).tolist()
    base_top = out.base_logits.argmax(-1).tolist()
    id2label = model.config.id2label
    flipped = 0
    for i, ranked in enumerate(predictions):
        assert ranked[0]["label"] == id2label[resmem_top[i]]
        # The pipeline's softmax over `logits` is the clamped, renormalised ResMem scores.
        probs = out.scores[i].clamp_min(model.config.score_floor)
        probs = probs / probs.sum()
        assert abs(ranked[0]["score"] - probs[resmem_top[i]].item()) < 1e-5
        flipped += resmem_top[i] != base_top[i]
    # Memorisation (k=1, small sigma): ResMem returns each training image's label (paper Remark 3.2) ...
    assert [id2label[y] for y in train["label"][:]] == [ranked[0]["label"] for ranked in predictions]
    # ... which differs from the base model's top label on some of them.
    assert flipped > 0
