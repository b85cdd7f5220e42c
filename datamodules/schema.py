"""The preference-dataset schema shared by the toy world, real-data builders and the datamodule.

One row is one preference pair for one prompt:

============================  =========  ==============================================
column                        type       meaning
============================  =========  ==============================================
``prompt``                    string     the text prompt both images answer (required)
``anti_stereotypical``        Image      the preferred image, x_w (required)
``stereotypical``             Image      the rejected image, x_l (required)
``group``                     string     the group the prompt names (optional)
``gender``                    string     the gender the prompt names (optional)
``anti_stereotypical_source`` string     ``"model"`` (a sample) or ``"render"``/``"photo"``
``stereotypical_source``      string     as above
``anti_stereotypical_seed``   int64      sampling seed, -1 when not sampled
``stereotypical_seed``        int64      sampling seed, -1 when not sampled
``rejection``                 string     why x_l was rejected, e.g. ``"stereotype"``, ``"gender"``
============================  =========  ==============================================

Splits are ``train`` and ``validation``.
"""

from __future__ import annotations

from datasets import Features, Image, Value

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "anti_stereotypical", "stereotypical")
IMAGE_COLUMNS: tuple[str, ...] = ("anti_stereotypical", "stereotypical")
SPLITS: tuple[str, ...] = ("train", "validation")

PREFERENCE_FEATURES = Features(
    {
        "prompt": Value("string"),
        "anti_stereotypical": Image(),
        "stereotypical": Image(),
        "group": Value("string"),
        "gender": Value("string"),
        "anti_stereotypical_source": Value("string"),
        "stereotypical_source": Value("string"),
        "anti_stereotypical_seed": Value("int64"),
        "stereotypical_seed": Value("int64"),
        "rejection": Value("string"),
    }
)
