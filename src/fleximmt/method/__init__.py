"""The method, for any base model, one concern a module:

- ``masks``: MDMA's masks, DMEM and RMPM as pure functions over tensors;
- ``kernels``: the mask kernels that compute MDMA inside attention ("auto", "dense", "flex"), registered
  with their layouts and constraints;
- ``tokens``: the tokens attention reads and where they sit (motion tokens per video and block, a row's
  text keys, this process's video tokens);
- ``rows``: which batch row is which video, and which rows feed RMPM;
- ``capture``: RMPM's features captured during the forward;
- ``layouts``: each step's (and DMEM's each block's) MDMA layouts;
- ``attention``: ``FlexiMMTState``, made of the parts above, and the two forms of attention with motion
  tokens (joint, cross); ``opaque``: those attentions as opaque operators under ``torch.compile``;
- ``pipeline``: FlexiMMT's options, one transfer's state and mask schedule (``build_transfer``) and the
  transfer around a diffusers pipeline;
- ``motion``: motion files; ``prompt``: motion words in prompts; ``adapter``: the contract every base
  model's adapter fulfils, and the registry of model families.

Nothing here imports a base model, training, evaluation or an app."""
