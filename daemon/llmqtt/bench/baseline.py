"""The bar a learned head must clear: TF-IDF + logistic regression, trained on the same rows as the head.

Word 1-2-grams and character 1-4-grams (which is what reads Chinese, written without spaces), sublinear
term frequencies, L2 logistic regression with C chosen by 5-fold cross-validation on the training rows only.
scikit-learn comes with the `bench` extra; the daemon never imports it.
"""

from __future__ import annotations

from typing import Sequence

from .accuracy import Scored
from .data import Row

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def tfidf_scored(train: Sequence[Row], test: Sequence[Row], labels: list[str]) -> Scored:
    """Fit on `train`, predict `test`; raises ImportError without scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True))
    model = make_pipeline(features, LogisticRegressionCV(Cs=list(C_GRID), cv=5, max_iter=2000, scoring="accuracy"))
    model.fit([r.text for r in train], [r.label for r in train])
    scored = Scored(labels)
    scored.gold = [r.label for r in test]
    scored.predicted = [str(p) for p in model.predict([r.text for r in test])]
    return scored
