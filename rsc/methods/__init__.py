"""De-biasing methods behind one interface, registered by name (``rsc.methods.METHODS``).

* ``none``: plain sampling; ``negative_prompt``; ``prompt_addition`` (:mod:`rsc.methods.plain`);
* ``rsc``: an exported refiner (:mod:`rsc.methods.refiner`);
* ``classifier_guidance`` (:mod:`rsc.methods.guidance`);
* ``semantic_guidance``: Fair Diffusion / SEGA via diffusers (:mod:`rsc.methods.semantic`);
* ``finetune_dpo``: a Diffusion-DPO LoRA on the same pairs (:mod:`rsc.methods.finetune`).
"""

from rsc.methods.base import METHODS, Method, MethodContext, SamplingSettings, build_method, register
from rsc.methods.finetune import FinetuneDPO
from rsc.methods.guidance import ClassifierGuidance
from rsc.methods.plain import NegativePrompt, NoCorrection, PromptAddition
from rsc.methods.refiner import RefinerMethod
from rsc.methods.semantic import SemanticGuidance

__all__ = [
    "METHODS",
    "ClassifierGuidance",
    "FinetuneDPO",
    "Method",
    "MethodContext",
    "NegativePrompt",
    "NoCorrection",
    "PromptAddition",
    "RefinerMethod",
    "SamplingSettings",
    "SemanticGuidance",
    "build_method",
    "register",
]
