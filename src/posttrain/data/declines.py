"""Declines: an answer that says the asked-about element or data is not in the chart.

LRV's negative instructions ask about things the chart does not hold, and their reference answers decline in
many wordings ("The data for … in 2016 is not available.", "No information is given about …", "The chart
does not feature …"). The same detector labels a reference answer as a negative (`posttrain.data.lrv`,
`posttrain.data.charts`) and recognises a model's response as a decline (evaluation, critics, preferences).

It is held to precision and recall 1.0 on the labelled phrasings in ``tests/data/declines.tsv`` (declines
in LRV's and the models' styles, and look-alikes that are not declines, such as "There is no significant
difference between 2019 and 2020." or "The sales did not show a consistent increase.").

What form alone cannot see: a statement that an element is absent reads as a decline whether or not the
question presupposed it ("There is no bar taller than the red bar." would count), and a decline worded
outside these forms is missed. On the synthetic data, where the asked element is known, a decline is only
correct if it names that element (see the evaluation).
"""

from __future__ import annotations

import re

_NOT = r"(?:(?:is|are|was|were)\s+not|isn't|aren't|wasn't|weren't)"
_ADVERB = r"(?:(?:explicitly|directly|clearly|specifically)\s+)?"
_ABSENT = (
    r"(?:available|provided|given|shown|mentioned|included|specified|indicated|depicted|displayed|"
    r"presented|listed|reported|represented|visible|present|labell?ed|known)"
)
_THERE_NO = (
    r"there(?:'s|\s+(?:is|are|was|were))\s+(?:no|not\s+(?:a|an|any))"
    r"|there\s+(?:isn't|aren't|wasn't|weren't)\s+(?:a|an|any)"
)
_ELEMENT = (
    r"(?:bar|line|slice|segment|sector|wedge|section|category|categor(?:y|ie)|column|point|label|legend|"
    r"entry|series|curve|colou?r)s?"
)
_INFO = r"(?:information|data|details?|mention|indication|records?|values?|figures?|numbers?)"
_CHART = r"(?:chart|graph|image|figure|plot|picture|diagram|legend|table)"
_SUBJECT = r"(?:chart|graph|image|figure|plot|picture|diagram|data|dataset|table|legend|visuali[sz]ation|it)"
_SHOW = (
    r"(?:show|include|provide|contain|mention|feature|display|have|depict|present|specify|indicate|give|"
    r"list|offer|cover|report|label)"
)
# "The chart does not show a (consistent) increase" answers a trend question; it declines nothing.
_TREND = (
    r"(?!\s+(?:an?\s+|any\s+)?(?:\w+\s+)?(?:increase|decrease|decline|rise|drop|growth|fall|change|trend|"
    r"difference|pattern|correlation)s?\b)"
)
_CANT = r"(?:cannot|can\s*not|can't|could\s+not|couldn't)"

DECLINE_PATTERN = re.compile(
    r"\b(?:"
    # "… is not available / provided / shown …"
    rf"{_NOT}\s+{_ADVERB}{_ABSENT}\b"
    # "there is no information / data …", "there are no values for 2020"
    rf"|(?:{_THERE_NO})\s+{_INFO}\b"
    # "there is no purple bar", "there isn't a green line", "there are no bars for 2022"
    rf"|(?:{_THERE_NO})\s+(?:[\w'-]+\s+){{0,5}}?{_ELEMENT}\b"
    # "there is no data for the year 2030 in the graph"
    rf"|(?:{_THERE_NO})\s+(?:[\w'-]+\s+){{0,8}}?(?:in|on)\s+the\s+(?:given\s+)?{_CHART}\b"
    # "the chart does not feature / provide …" (not "does not show an increase")
    rf"|{_SUBJECT}\s+(?:(?:does|do|did)\s+not|doesn't|don't|didn't)\s+{_ADVERB}{_SHOW}\b{_TREND}"
    # "no information is given about …", "provides no information", "lacks information"
    rf"|no\s+{_INFO}\s+(?:is|are|was|were)\s+{_ABSENT}\b"
    rf"|(?:provides|gives|contains|has|shows|includes|offers)\s+no\s+{_INFO}\b"
    rf"|lacks?\s+(?:any\s+)?{_INFO}\b"
    # "I don't see a …", "I cannot find …"
    rf"|I\s+(?:(?:do|did)\s+not|don't|didn't|{_CANT})\s+(?:see|find|identify|locate|spot|determine|tell)\b"
    # "cannot be determined", "it is not possible to tell", "is unknown"
    rf"|{_CANT}\s+be\s+(?:determined|found|identified|seen|answered|known|inferred|calculated|read)\b"
    r"|not\s+possible\s+to\s+(?:determine|tell|say|know|answer|find)\b"
    r"|(?:is|are|remains?)\s+unknown\b"
    r"|no\s+such\b"
    r"|(?:(?:does|do)\s+not|doesn't|don't)\s+exist\b"
    r")",
    re.IGNORECASE,
)


def is_decline(text: str) -> bool:
    """Whether `text` declines: says the asked-about element or data is not in the chart."""
    return DECLINE_PATTERN.search(text) is not None
