"""interp: mechanistic interpretability on TransformerLens hooks.

Subnetworks as differentiable weight masks, trained for an objective, then read, edited,
ablated and compared. See docs/ and DESIGN.md for the architecture.
"""

from interp.data.bigram import BigramCounts
from interp.data.images import (
    ImageSet,
    builtin_images,
    load_hf_images,
    load_image_array,
    load_image_folder,
)
from interp.data.text import (
    Corpus,
    TokenizedCorpus,
    builtin_corpus,
    iterate_batches,
    load_hf_text,
    load_text_files,
    load_tokenizer,
    to_sequences,
    tokenize_corpus,
    train_tokenizer,
)
from interp.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HookError,
    InterpError,
    MaskError,
    ModelLoadError,
)
from interp.masks import (
    ContinuousSparsification,
    FitResult,
    HardConcrete,
    MaskSet,
    Target,
    find_targets,
    fit_masks,
    random_masks,
)
from interp.models.checkpoints import CheckpointStore
from interp.models.classifier import (
    ClassifierConfig,
    ClassifierTrainConfig,
    CNNClassifier,
    MLPClassifier,
    train_classifier,
)
from interp.models.lm import (
    PRESETS,
    LMConfig,
    TrainConfig,
    build_lm,
    evaluate_loss,
    load_hf_lm,
    train_lm,
)
from interp.models.pixel import FullPixelCNN, LocalPixelCNN, PixelConfig, pixel_targets
from interp.models.pixel_train import PixelTrainConfig, evaluate_bpd, train_pixel_model
from interp.numerics import no_denormals
from interp.objectives import (
    BigramObjective,
    LMObjective,
    PixelMatchObjective,
    SelfDistillationObjective,
)
from interp.report import Report
from interp.results import Result, bulky

__version__ = "0.1.0"
