"""Stage 1 of the paper (Section 2.5): which cervical vertebrae C1..C7 each axial slice shows.

==================  ==================================================================
module              what it holds
==================  ==================================================================
``config``          :class:`Stage1Config` (data, model, train, sequence sections)
``runs``            the run folder: its file names, its preprocessing record, its log
``dataset``         :class:`CSpineSequence` (a Keras PyDataset), augmentation, splits
``models/``         GCViT, the baselines, the classifier, the registry, weights
``callbacks``       the atomic best checkpoint, ReduceLROnPlateau on val macro F1
``train``           :func:`train_stage1` (resumable)
``metrics``         macro F1, exact match ratio, coverage error; the RSNA log loss
``evaluate``        Tables 1-2 and Figure 6 for a run
``level_decoding``  the study-level decoder (beyond the paper)
``sequence_model``  the study sequence model (beyond the paper)
``inference``       :class:`Stage1Model`: a run applied to a study's slices
==================  ==================================================================
"""
