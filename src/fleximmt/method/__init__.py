"""The method, for any base model: MDMA's masks (``masks``), motion tokens and MDMA inside attention
(``attention``), RMPM's schedule and the transfer around a diffusers pipeline (``pipeline``), motion
files (``motion``), motion words in prompts (``prompt``) and the contract every base model's adapter
fulfils (``adapter``). Nothing here imports a base model, training, evaluation or an app."""
