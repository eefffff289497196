"""The device side: a TorchRec sequential ranker with an editable head.

Modules (one concern each)::

    config     ModelConfig, IdFeatureConfig (extra aligned id features, e.g. codes)
    features   ragged histories -> KeyedJaggedTensor, padding, seen-item masks
    model      SeqRanker: EmbeddingCollection -> SASRec encoder -> head -> scores [B, I]
    head       EditableHead: user state [B, D] -> query [B, D]; EditedWeights (factored)
    edits      HeadEdit / LayerEdit (plain-data edit format), EditBounds
    edit_apply prepare_edit / prepare_decoded: validate an edit, factored head weights
    ranker     Ranker: inference engine (top-K, seen excluded, edits, batch, export)
    export     torch.export serving program + ExportedRanker
    train      TrainConfig, train(cfg, dataset, ...) -> TrainResult, checkpoints
    evaluate   full-catalogue HR/NDCG/MRR, popularity baseline
    finetune   on-device head fine-tuning baseline with its cost
    bench      figures for ``recsys bench ranker`` (edit_bench: the edit path's rows)

Depends on ``recsys`` core only (data, metrics, errors, the edit payload codec); edits
arrive as plain data.
Heavy imports stay in the submodules, so ``import device_ranker`` is cheap.
"""
