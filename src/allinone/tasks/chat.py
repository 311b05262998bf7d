"""Open-domain multi-turn chat: a conversation validated at the edge, as one engine job, and
the refusal guard around its reply.

When the conversation does not fit the context window, the engine drops its oldest turns first
(see :mod:`allinone.engine.prompts`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..engine import GenerateJob, Prompt
from ..errors import InvalidInputError
from ..results import ChatChunk
from ..types import SamplingParams, is_blank, validate_messages


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, ready for the engine.

    ``messages`` is a list of ``{"role", "content"}`` (a plain string becomes one user message);
    ``system`` (optional) is put first as a system message.
    """

    messages: tuple[dict[str, str], ...]
    sampling: SamplingParams
    #: a conversation too long for the context is cut (``True``) or refused (see ``Prompt.cut``)
    cut: bool = True
    #: the caller set a system prompt (``system``, or a system or ``developer`` message, not
    #: blank), rather than the profile's: its assistant is not given written first words
    own_system: bool = False

    @classmethod
    def build(cls, messages: str | Sequence[dict[str, Any]], *, system: str | None = None,
              sampling: SamplingParams | None = None, profile: "ChatProfile | None" = None,
              mood: str | None = None, lang: str | None = None, cut: bool = True,
              max_chars: int | None = None) -> "ChatRequest":
        """Validate the input at the edge (``max_chars``: the most characters one message or
        ``system`` may hold; ``None``: no limit).

        Raises:
            InvalidInputError: empty messages, unknown roles, non-text content, a message longer
                than ``max_chars`` (``param`` ``messages[i].content``, ``i`` the caller's index),
                or a conversation with nothing for the model to answer (no user message / empty
                last user message).
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            if not isinstance(system, str):
                raise InvalidInputError("system must be a string", param="system")
            if max_chars is not None and len(system) > max_chars:
                raise InvalidInputError(f"system is {len(system)} characters; the limit is {max_chars}", param="system")
        checked = validate_messages(messages)
        for i, m in enumerate(checked if max_chars is not None else ()):
            if len(m["content"]) > max_chars:
                raise InvalidInputError(f"messages[{i}] is {len(m['content'])} characters; the limit is {max_chars}",
                                        param=f"messages[{i}].content")
        if system is not None and not is_blank(system):  # an empty system prompt says nothing: the default one speaks
            checked = [{"role": "system", "content": system}, *checked]
        # a blank system message says nothing either, as a blank ``system``
        msgs = [m for m in checked if m["role"] != "system" or not is_blank(m["content"])]
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            raise InvalidInputError("messages must contain at least one user message", param="messages")
        if msgs[-1]["role"] == "user" and is_blank(msgs[-1]["content"]):
            raise InvalidInputError("the last user message is empty", param="messages")
        own_system = any(m["role"] == "system" for m in msgs)
        if profile is not None:
            msgs = profile.apply(msgs, mood, lang)
        return cls(tuple(msgs), sampling or SamplingParams(), cut, own_system)

    def job(self, reply_prefix: str = "", *, min_tokens: int = 0, written_only: bool = False) -> GenerateJob:
        """The engine's job for this conversation (``reply_prefix``: the reply's first words,
        already written; the model continues from them with at least ``min_tokens`` tokens of
        its own, at most ``max_tokens``, unless the request asks for more already;
        ``written_only``: they are the whole reply, the model adds nothing)."""
        sampling, wanted = self.sampling, min(min_tokens, self.sampling.max_tokens)
        if wanted > sampling.min_tokens:
            sampling = sampling.updated(min_tokens=wanted)
        return GenerateJob(Prompt(messages=self.messages, reply_prefix=reply_prefix, cut=self.cut), sampling,
                           written_only=written_only)

    @property
    def last_user(self) -> str:
        """The text of the last user message (what the reply answers)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def recent_user(self, n: int = 2) -> list[str]:
        """The texts of the last ``n`` user messages, oldest first (a follow-up such as "yes,
        give me the steps for it" asks for what the message before it named)."""
        return [m["content"] for m in self.messages if m["role"] == "user"][-n:]

    def steered(self, line: str) -> "ChatRequest":
        """The same request with ``line`` added to its system prompt (a new one first if it has none)."""
        return replace(self, messages=tuple(with_system_line(list(self.messages), line)))


def with_system_line(msgs: list[dict[str, str]], line: str) -> list[dict[str, str]]:
    """``msgs`` with ``line`` on a line of its own at the end of the first system message (a
    system message of ``line`` put first if there is none)."""
    first = next((i for i, m in enumerate(msgs) if m["role"] == "system"), None)
    if first is None:
        return [{"role": "system", "content": line}, *msgs]
    return [*msgs[:first], {**msgs[first], "content": f"{msgs[first]['content']}\n{line}"}, *msgs[first + 1:]]


@dataclass(frozen=True)
class ChatProfile:
    """How the assistant talks when the caller sets no system prompt, from the ``chat`` task's
    declaration: its instructions (the system prompt, in the language of the user's last
    message), its examples (earlier turns, in that language, put before the conversation) and
    its ``mood`` lines (added to the system prompt when the reply is to a message whose
    sentiment is known, e.g. ``negative``: acknowledge the feeling first)."""

    instructions: dict[str, str]
    examples: tuple[tuple[str | None, str, str], ...] = ()
    mood: dict[str, dict[str, str]] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> "ChatProfile":
        return cls(dict(spec.instructions), tuple((ex.lang, ex.text, ex.output) for ex in spec.examples),
                   dict(spec.mood) or None)

    def apply(self, msgs: list[dict[str, str]], mood: str | None = None,
              lang: str | None = None) -> list[dict[str, str]]:
        """``msgs`` with the profile's system prompt and example turns first, unless the
        conversation has a system message of its own (then only the mood line is added to it);
        in ``lang``, else the language of the last user message."""
        from .prompting import detect_lang, pick

        last = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        lang = lang or detect_lang(last)
        line = pick(self.mood.get(mood, {}), lang) if self.mood and mood else ""
        if any(m["role"] == "system" for m in msgs):
            return with_system_line(msgs, line) if line else msgs
        system = pick(self.instructions, lang)
        if line:
            system = f"{system}\n{line}"
        shots = [ex for ex in self.examples if ex[0] in (None, lang)]
        turns = [t for _, user, reply in shots for t in ({"role": "user", "content": user},
                                                         {"role": "assistant", "content": reply})]
        return [{"role": "system", "content": system}, *turns, *msgs]


#: how a refusal opens, English and Chinese (the first 120 characters of a reply are searched):
#: the openings the 0.5B model uses to decline, "I'm sorry, but I can't assist with that
#: request." / "很抱歉，我无法协助完成这个请求。", and their kin. "I'm sorry to hear that" is sympathy,
#: not a refusal, and does not match.
REFUSAL_PATTERNS = (
    r"\bI(?:'m| am) sorry,? but I (?:can(?:'|no)t|am unable|won't)", r"\bI can(?:'|no)t (?:help|assist|provide|do)(?: you)? (?:with )?(?:that|this)",
    r"\bI(?:'m| am) (?:not able|unable) to (?:help|assist|provide|comply)", r"\bAs an AI(?: language model)?,? I",
    r"\bI (?:must|have to) (?:decline|refuse)", r"\bI won't be able to help",
    r"很抱歉[，,]?\s*(?:我)?(?:无法|不能)", r"对不起[，,]?\s*(?:我)?(?:无法|不能)", r"我无法(?:协助|帮助|帮你|提供|完成|回答)",
    r"我不能(?:协助|帮助|帮你|提供|回答)", r"作为(?:一个)?(?:AI|人工智能|语言模型|AI助手)", r"抱歉[，,]?\s*这个(?:请求|问题)",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
#: the words a refusal starts with; a reply that opens with one is held back until it is decided
_OPENERS = ("I'm sorry", "I am sorry", "Sorry", "I apologize", "Unfortunately", "I can't", "I cannot", "I'm not able",
            "I am not able", "I'm unable", "I am unable", "As an AI", "I must", "I have to", "I won't",
            "很抱歉", "抱歉", "对不起", "我很抱歉", "我无法", "我不能", "作为")
_SENTENCE_END = re.compile(r"[.!?。！？\n]")
#: the part of a reply searched for a refusal
OPENING_CHARS = 120

#: how the reply to a benign request asked again begins, by the message's sentiment (``None``:
#: not known) and language: the model continues after these words instead of choosing its
#: opening, where it would refuse again (measured: the steering line alone left greedy
#: refusals in place)
RETRY_OPENING = {
    None: {"en": "Sure.", "zh": "好的。"},
    "negative": {"en": "I understand.", "zh": "我理解你的感受。"},
    # not "That's great!": a sad message scored positive would be met with joy
    "positive": {"en": "Thank you for sharing that.", "zh": "谢谢你和我分享。"},
}
#: how the reply to a message that tells of a feeling and asks for nothing (:func:`asks`)
#: begins, by the message's mood: the mood line alone left the 0.5B model going straight to
#: advice ("外卖送错了，商家还不给退款。" → "收到外卖后，商家应该尽快联系你……") or echoing good news
#: (development prompts, docs/evaluation.md "Chat"); written first, the model continues after
#: them. A message that asks is answered as the model chooses (its mood line still asks for a
#: sentence of sympathy), so a request scored negative is not met with a fixed condolence,
#: unless it asks in words that tell a feeling (:data:`FEELING_PATTERNS`). The
#: English negative opening speaks to the user in its second sentence, as the Chinese one does
#: ("你的心情"): after "I'm sorry to hear that." alone the model went on as the user in 3 of 10
#: English development replies ("First, I'll try to get some sleep.", "I'll try to find a new
#: job soon."), after this one in none (docs/evaluation.md, "The model speaks to the user").
FEELING_OPENING = {
    "negative": {"en": "I'm sorry to hear that. That sounds really hard for you.", "zh": "听到这些，我能理解你的心情。"},
    "positive": {"en": "That's wonderful!", "zh": "太好了！"},
    # a death told (:func:`tells_of_loss`): the whole reply (:func:`is_whole_reply`)
    "loss": {"en": "I'm so sorry for your loss. Losing someone you love is so hard. Take all the time you need, "
                   "and I'm here if you want to talk about it.",
             "zh": "听到这个消息，我很难过，请节哀。失去所爱真的很痛，给自己一些时间。如果你想聊聊，我一直都在。"},
}
#: the DRY penalty on a chat reply repeating its own words (the sampling option
#: ``dry_multiplier``; 0.8 is the method's recommended value): greedy, the
#: 0.5B model looped "I'm sorry to hear that." to ``max_tokens`` (the emotional set, MT-Bench)
CHAT_DRY_MULTIPLIER = 0.8
#: the tokens the model writes after :data:`FEELING_OPENING` or :data:`RETRY_OPENING` before it
#: may end the reply (:func:`continuation_min_tokens`): greedy, 8 of 60 replies to the
#: emotional set were the written sentence alone ("I'm sorry to hear that."), the model ending
#: right after it
OPENING_MIN_TOKENS = 8
#: a message in a Latin-script language other than English (accented letters, "¡", "¿"), or one
#: without a common English word: the written words are English or Chinese, and a French or
#: Spanish feeling begun in English was answered in English (a fresh user's probe)
_NOT_ENGLISH = re.compile(r"[À-ÖØ-öø-ɏ¡¿]")
_ENGLISH_WORDS = re.compile(r"\b(?:i|i'm|i've|my|the|is|was|are|and|to|it|just|got|our|we|have|has|been|this|that|"
                            r"today|can't|don't|feel|of|for|with|not)\b", re.IGNORECASE)
#: the sentiment score a mood needs before the reply is begun with :data:`FEELING_OPENING`:
#: on the development prompts the head scored "I just ran my first 10k without stopping!"
#: negative 0.51 and "I finally lost ten kilos!" positive 0.64, and every message it scored at
#: 0.8 or more had that feeling; below it the mood line alone speaks
FEELING_MIN_SCORE = 0.8


#: words that tell a feeling (English and Chinese): a short message that asks for help and says
#: one of them of the user (:data:`_OWN_FEELING`: "I'm panicking. How do I get through tonight?",
#: "我真的很生气，能帮我想想怎么跟他谈吗？"), or tells of a loss, is met like a feeling told, its
#: reply begun with :data:`FEELING_OPENING` before the help; not a message that gives a text for
#: a task ("Translate to French: I'm so excited!") or a long one, which may quote anything. The
#: sentiment head cannot tell these from plain requests: on development prompts it was as sure
#: of "How do I change the oil in my car?" (negative 0.90) as of any complaint, so a request
#: without one of these words keeps the model's own opening. A keyword rule: a feeling worded
#: otherwise ("My landlord still hasn't fixed the heating after a month. What can I do?") is
#: left to the model.
_FEELING_EN = (
    # not "sad", "hate", "afraid": "recommend me a sad film", "my kids hate vegetables", "I'm afraid
    # I don't follow" tell no feeling of the user's
    r"stress(?:ed|ful)?|anxious|anxiety|worr(?:y|ied|ying)|panic(?:king|ked)?|scared|terrified|"
    r"nervous|overwhelm(?:ed|ing)|exhausted|burn(?:ed|t) out|depressed|lonely|heartbroken|hurt|upset|angry|"
    r"furious|annoy(?:ed|ing)|frustrat(?:ed|ing)|disappointed|ashamed|embarrassed|guilty|useless|worthless|"
    r"hopeless|helpless|miserable|cry(?:ing)?|cried|fed up|sick of|excited|thrilled|overjoyed|so happy|"
    r"so proud|can't wait")
_FEELING_ZH = (r"难过|伤心|难受|痛苦|委屈|生气|气死|愤怒|烦死|好烦|焦虑|紧张|害怕|担心|崩溃|压力|心累|失望|绝望|孤独|寂寞|沮丧|"
               r"郁闷|抑郁|哭|无助|没用|一无是处|后悔|丢脸|尴尬|开心|高兴|激动|兴奋|太好了|终于|骄傲|幸福")
FEELING_PATTERNS = (rf"\b(?:{_FEELING_EN})\b", _FEELING_ZH)
#: the message gives a text for a task (to translate, classify, summarize, correct ...), set off
#: by a colon or quotes: its words are not the user's own feeling ("Translate to French: I'm so
#: excited for my trip!", "判断其中的情感：“我今天得到了晋升，感觉非常高兴。”")
_GIVEN_TEXT = re.compile(r"以下|下面的|给定|文本|这段|这句|句子|这条|评论|翻译|译成|总结|概括|改写|润色|分类|情感|"
                         r"[“「『\"：:]|'[^']*'(?!\w)|\b(?:translat|summar|classif|paraphras|rewrit|proofread)\w*|"
                         r"\bsentiment\b|\bthe following\b|\b(?:this|the) (?:text|sentence|passage|paragraph|review)\b",
                         re.IGNORECASE)
#: a feeling word said of the user: after "I", "I'm", "we" ... and at most three words
#: ("I keep worrying", "I feel so lonely"), or after 我/自己/感觉 and at most four characters, or
#: after a degree word (很/太/特别 ...: "每天都很难受"); "a movie that will make me cry", "our users
#: are frustrated", "关于孤独的作文", "让人开心的电影" are not the user's feeling
_OWN_FEELING = re.compile(
    rf"\b(?:I|I'm|I've|I am|we|we're|we are)\s+(?:[\w']+\s+){{0,3}}?(?:{_FEELING_EN})\b"
    rf"|(?:我|自己|感觉|心里|心情)[^，。！？,.!?\s]{{0,4}}?(?:{_FEELING_ZH})"
    rf"|(?:很|好|太|特别|非常|超级|真的)(?:{_FEELING_ZH})",
    re.IGNORECASE)


def may_tell_feeling(message: str, lang: str) -> bool:
    """``message`` (in ``lang``, :func:`detect_lang`) tells a feeling: it asks for nothing
    (:func:`asks`), or it is short and asks in words of the user's own feeling
    (:data:`FEELING_PATTERNS`) or after a loss told (:func:`tells_of_loss`); it gives no text
    for a task (a colon, quotes, "translate", "情感" ...); and it is in
    English or Chinese, the languages of :data:`FEELING_OPENING`: whether its reply may begin
    with one, once its sentiment is known. ``chat`` computes the sentiment of such a message
    only; another request is answered without that extra pass."""
    if (asks(message) and not _asks_telling_feeling(message) or lang not in FEELING_OPENING["negative"]
            or _GIVEN_TEXT.search(message)):
        return False
    # another language: the model answers in it, from its own first word
    return lang != "en" or not _NOT_ENGLISH.search(message) and bool(_ENGLISH_WORDS.search(message))


def _asks_telling_feeling(message: str) -> bool:
    return len(message) <= TELL_MAX_CHARS and (bool(_OWN_FEELING.search(message)) or tells_of_loss(message))


def feeling_opening(message: str, mood: str | None, score: float, lang: str) -> str:
    """The first words of the reply to ``message`` whose sentiment is ``mood`` with ``score``
    (a probability, 0–1) and language ``lang`` (``en`` or ``zh``, :func:`detect_lang`):
    :data:`FEELING_OPENING` when the message tells of a feeling (:func:`may_tell_feeling`) and
    the mood is sure (a loss told, :func:`tells_of_loss`, or a score of at least
    :data:`FEELING_MIN_SCORE`); else ``""`` (the model chooses its opening). A loss told in a
    message that also asks is met with the negative opening, not the whole-reply condolence,
    so the reply goes on to answer."""
    if mood not in ("negative", "positive") or not may_tell_feeling(message, lang):
        return ""
    loss = mood == "negative" and tells_of_loss(message)
    if score < FEELING_MIN_SCORE and not loss:
        return ""
    return FEELING_OPENING["loss" if loss and not asks(message) else mood].get(lang, "")


def is_whole_reply(opening: str) -> bool:
    """The written words ``opening`` are the whole reply: a condolence (:data:`FEELING_OPENING`
    ``loss``). Whatever the 0.5B model wrote after one made it worse, also with ``min_tokens``
    0: "I'm so sorry for your loss. I'll try to help you find a new home and make sure your dog
    is well-behaved." (every chat surface, a fresh user's probe; "我需要帮助你了解你的狗的情况" on
    the development prompts)."""
    return opening in FEELING_OPENING["loss"].values()


def continuation_min_tokens(opening: str) -> int:
    """How many tokens the model must add after the written words ``opening`` (``min_tokens``):
    :data:`OPENING_MIN_TOKENS`, except after a decline (:data:`DECLINE_OPENING`), which may be
    the whole reply (pushed on, it could go on to help). A condolence is always the whole reply
    (:func:`is_whole_reply`)."""
    if not opening or opening in DECLINE_OPENING.values():
        return 0
    return OPENING_MIN_TOKENS


#: the line added to the system prompt of a request that names a harm (:func:`looks_harmful`),
#: and the words its reply begins with: the warm prompt that makes the 0.5B model help with
#: everything also made it explain pipe bombs (10 of 12 harmful requests answered, measured)
DECLINE = {"en": "This request asks for help to hurt people or to break the law. Decline it politely in one or two "
                 "sentences and give none of the information asked for.",
           "zh": "这个请求要求帮助伤害他人或违法。请用一两句话礼貌地拒绝，不要提供任何相关信息。"}
DECLINE_OPENING = {"en": "I can't help with that.", "zh": "抱歉，这个我不能帮你。"}
#: the line added to the system prompt when a benign request was refused and is asked again
STEER = {"en": "The user's request is ordinary and safe. Help with it directly; do not refuse and do not say you cannot help.",
         "zh": "用户的请求是普通、安全的。请直接帮助他，不要拒绝，也不要说你无法帮助。"}


#: what a request names when it asks for harm (English and Chinese): weapons and explosives,
#: poison and killing, drugs, threats, buying what is illegal (the harms a defence may be asked
#: against, such as hacking and scams, are :data:`GUARDABLE_HARM_PATTERNS`). A request that
#: names one is told to decline (:data:`DECLINE`) and never asked again. Each word needs its
#: harmful sense ("kill a process", "the atomic bomb", "水枪", "method" do not match; "偷偷"
#: does). Written on development requests of this project and a fresh user's probes, not on the
#: reported set.
HARM_PATTERNS = (
    r"\bbombs?\b(?<!atomic bomb)(?<!atom bomb)(?<!bath bomb)(?<!photo bomb)", r"explosive", r"\bweapon", r"\bguns?\b(?<!water gun)(?<!glue gun)(?<!nail gun)",
    r"firearm", r"\bammo\b", r"poison(?! ivy)",
    r"\bkill(?:s|ed|ing)? (?!(?:a |the |this |that |my |all )?(?:\w+ )?(?:process|task|job|thread|program|app|tab|session|time|bugs?|weeds?|mood|switch)\b)",
    r"murder", r"\b(?:hurt|harm|attack|stab|shoot) (?:someone|somebody|people|him|her|them|my)", r"toxic gas",
    r"\bmeth\b", r"methamphetamine", r"cocaine", r"heroin", r"fentanyl",
    r"\b(?:illegal|street|recreational) drugs?\b", r"\b(?:buy|sell|make|cook|smuggle)(?:s|ing)? (?:\w+ )?drugs?\b",
    r"\bthreaten", r"\b(?:death|bomb) threat", r"blackmail", r"extort", r"break into",
    r"without (?:getting caught|a background check|them knowing|(?:him|her) knowing)",
    r"\btricks? (?:people|someone|them)", r"\billegal(?:ly)? (?:guns?|weapons?|firearms?|drugs?)",
    r"someone's password", r"\bstalk(?:ing|ed|er)?\b",
    r"炸弹", r"炸药", r"爆炸物", r"(?<!水)(?<!玩具)枪", r"武器", r"弹药", r"毒药", r"下毒", r"投毒", r"毒气", r"杀人", r"杀死(?!细菌|病毒|害虫)", r"杀掉",
    r"结束(?:自己的)?生命", r"杀了自己", r"伤害(?:他|她|别人|他人)", r"毒品", r"冰毒", r"海洛因", r"大麻", r"入侵(?=别人|他人|他的|她的|系统|网站|账号|账户|电脑|手机|服务器)",
    r"骗(?:别人|他人)", r"冒充", r"撬", r"威胁(?=他|她|我的|别人|他人|同事|邻居|对方)", r"恐吓", r"勒索", r"非法(?:获取|购买|入侵|集资|持有|出售)", r"违禁",
    r"不被发现",
)
#: how a message asks for something (a question how to, "help me", "I want to", an imperative
#: opening a sentence, "教我", "怎么" ...): a harm's words count only in a message that asks, so
#: telling of one ("My friend died by suicide last year", "the film's murder scene", a review
#: quoted for a task) is never declined; 53 of the 6,000 SST-2 pool sentences named a harm
#: (murder, guns, drugs, steal, scam) without asking for anything
REQUEST_PATTERNS = (
    r"\bhow (?:do|does|did|can|could|would|should|to|might|will|much|many)\b", r"\bhow\b[^.!?]*\?",
    r"\b(?:best|easiest|quickest|fastest|safest|cheapest|simplest) way", r"\bways? (?:to|of)\b", r"\bis there a way\b",
    r"\b(?:help|teach|show|tell|give|get|find) (?:me|us)\b", r"\bstep[- ]by[- ]step\b", r"\binstructions?\b", r"\bguide\b",
    r"\bwhere (?:can|could|do|should|would) (?:i|we|one)\b", r"\bwhat should (?:i|we)\b",
    r"\b(?:i|we) (?:want|need|plan|intend|would like|wanna) to\b", r"\b(?:i|we)(?:'m| am|'re| are) (?:going|planning|trying) to\b",
    r"\b(?:i|we)(?:'d| would) like to\b", r"\b(?:can|could|would|will) you\b",
    r"\b(?:i|we)(?:'ll| will| shall|'m gonna| am gonna| are gonna|'re gonna)\b",  # an intent told ("I will hurt him")
    r"我(?:要|会|打算|准备)",
    r"(?:^|[.!?]\s+)(?:please\s+)?(?:write|create|make|build|generate|draft|compose|explain|describe|design|plan|find|give|"
    r"teach|show|tell|help|code|list|buy|get|do)\b",
    r"怎么|怎样|如何|教我|帮我|告诉我|给我|方法|步骤|哪里|我想|我要|能不能|可以吗|有什么办法|办法|请你|请帮|写一|写个|做一|做个",
)
#: harms that people often ask to guard against ("how to prevent phishing", "防止黑客访问"):
#: they count only without a defence (:data:`DEFENSIVE_PATTERNS`) in the
#: :data:`DEFENSIVE_REACH` characters before them
GUARDABLE_HARM_PATTERNS = (
    r"(?<!life )\bhack(?:ing|ed|er|ers)?\b(?! ?(?:day|athon|away)\b)", r"phishing", r"\bsteal", r"\bscam", r"fraud",
    r"spyware", r"malware", r"ransomware", r"\b(?:write|create|make|build|code|spread)(?:s|ing)? (?:a |an )?(?:computer )?virus\b",
    r"card numbers?",
    r"(?<!被)黑客(?!攻击)", r"盗号", r"破解", r"钓鱼邮件", r"钓鱼网站", r"诈骗", r"骗取", r"(?<!被)偷", r"监控软件", r"木马",
    r"(?:电脑|计算机|手机)病毒", r"(?:做|写|制作|编写|传播)病毒",
)
DEFENSIVE_PATTERNS = (
    r"\bprevent", r"\bprotect", r"\bdefend", r"\brecogni[sz]e", r"\bavoid (?:being|getting) (?:scammed|hacked|phished)",
    r"防止", r"防范", r"预防", r"识别", r"保护",
)
#: characters before a guardable harm's words searched for a defence ("protect my email from hackers")
DEFENSIVE_REACH = 24
_HARM = re.compile("|".join(HARM_PATTERNS), re.IGNORECASE)
_REQUEST = re.compile("|".join(REQUEST_PATTERNS), re.IGNORECASE)
_GUARDABLE = re.compile("|".join(GUARDABLE_HARM_PATTERNS), re.IGNORECASE)
_DEFENSIVE = re.compile("|".join(DEFENSIVE_PATTERNS), re.IGNORECASE)


#: how a message asks besides :data:`REQUEST_PATTERNS` (which the harm rule also reads): any
#: question, a question word or an imperative opening a sentence ("Rewrite your previous
#: response", "Given the following data", "Prove ...", "play the song ..."), a task's material
#: ("the following", a code block), and Chinese instructions ("请", "以下", "推荐", "解释一下",
#: "吗"). Broad on purpose: a message taken for a request is answered as the model chooses,
#: one taken for a feeling told gets :data:`FEELING_OPENING`. Written on the development
#: prompts, 2,000 SNIPS pool queries (requests) and 2,000 SST-2 / ChnSentiCorp pool
#: sentences (statements), never on a reported file (docs/evaluation.md, "Chat").
ASK_PATTERNS = (
    r"[?？]", r"```", r"\bthe following\b", r"\b(?:i|we) (?:need|want|wish)\b", r"\b(?:i|we)(?:'d| d| would) (?:like|love)\b",
    r"\blooking for\b", r"^\s*(?:weather|forecast|restaurant|table|reservation|movie|song|album|playlist)s?\b", r"\byour (?:previous|earlier|last|above) (?:response|reply|answer)",
    r"\b(?:please|kindly)\b", r"(?:^|[.!:;,\n]\s*)(?:please|now|also|then|ok(?:ay)?|so)?,?\s*(?:what|why|when|where|who|whom|whose|which|how|is|are|am|was|were|"
    r"do|does|did|can|could|should|would|will|shall|may|might|must|"
    r"rewrite|rephrase|revise|rework|reformulate|modify|amend|update|edit|fix|correct|improve|shorten|expand|"
    r"summari[sz]e|translate|paraphrase|take|imagine|suppose|pretend|act|play|embrace|consider|assume|let's|let|"
    r"develop|implement|prove|solve|calculate|compute|evaluate|analy[sz]e|identify|extract|discuss|compare|pick|"
    r"provide|suggest|recommend|craft|come|name|classify|choose|select|convert|output|return|determine|express|"
    r"debug|given|use|read|answer|continue|outline|add|remove|delete|set|book|reserve|search|look|check|rate|"
    r"send|call|open|turn|start|stop|remind|schedule|show|put|say|sing|describe|define|predict|estimate|"
    r"generate|write|create|make|build|draft|compose|explain|design|plan|find|give|teach|tell|help|code|list|"
    r"buy|get|do|try|go|keep|include|ignore|respond|reply|rank|sort|count|format|fill|complete|finish)\b",
    # a follow-up that qualifies the request before it ("But I am allergic to many medicines")
    r"^\s*(?:but|and|however|what about|then)\b", r"^\s*(?:但是?|可是|不过|那么?|还有|另外)",
    r"^\s*(?:您|将|把|给|为|用|以|对|从|在|向|求)",  # a preposition opening the message, not a clause ("，以后")
    r"(?:^|[。！；：，,\n]\s*)(?:请|使用|利用|根据|按照|基于|针对|判断|选择|计算|回答|解释|"
    r"介绍|推荐|总结|概括|概述|归纳|改写|重写|重新|润色|修改|纠正|翻译|描述|描绘|讲述|阐述|说明|分析|比较|评价|分类|定义|"
    r"列出|列举|找出|想出|提出|给出|提供|编辑|编写|撰写|设计|构想|制定|制作|创造|生成|创作|写|思考|说说|讲讲|谈谈|想象|假设|"
    r"扮演|模拟|指定|如果)",
    r"以下|下面|下列|如下|一下|吗|呢|什么|为什么|为何|多少|几[个本种条次]|哪|谁|是否|能否|可否|推荐|建议我",
)
_ASK = re.compile("|".join(ASK_PATTERNS), re.IGNORECASE)
#: a longer message is a text given for a task (a review to judge, an article to sum up), not
#: a feeling told: every message with a feeling of the development and emotional sets is under 100
TELL_MAX_CHARS = 200


def asks(message: str) -> bool:
    """The message asks for something (:data:`REQUEST_PATTERNS`, :data:`ASK_PATTERNS`) or is
    longer than :data:`TELL_MAX_CHARS`, rather than only telling ("外卖送错了，商家还不给退款。",
    "We closed on our first house today!"). A keyword rule: an imperative whose verb is not
    listed counts as telling."""
    return len(message) > TELL_MAX_CHARS or bool(_REQUEST.search(message) or _ASK.search(message))


def looks_harmful(request: str) -> bool:
    """The message asks for something (:data:`REQUEST_PATTERNS`) and names a harm of
    :data:`HARM_PATTERNS`, or one of :data:`GUARDABLE_HARM_PATTERNS` not guarded against just
    before it; then its refusal is never replaced. A keyword rule: a harm worded without a
    listed word is not caught, and a long passage quoted for a task (an article to summarize)
    that names a harm can trip it."""
    if not _REQUEST.search(request):
        return False
    return bool(_HARM.search(request)) or any(
        not _DEFENSIVE.search(request, max(0, m.start() - DEFENSIVE_REACH), m.start()) for m in _GUARDABLE.finditer(request))


#: a death or a loss the user tells of (English and Chinese). The sentiment head, fit on reviews,
#: scored "我养了十年的狗今天早上去世了。" positive 0.90 and "My grandfather passed away last night."
#: positive 0.69, and the good-news mood line then asked for congratulations (development
#: prompts, docs/evaluation.md); such a message gets the sad mood line whatever its score
LOSS_PATTERNS = (
    r"\bpass(?:ed|es)? away\b", r"\b(?:died|has died|have died)\b", r"\bfuneral\b", r"\bmiscarriage\b",
    r"\blost (?:my|our) (?:\w+ )?(?:mother|father|mom|mum|dad|wife|husband|partner|son|daughter|baby|child|brother|"
    r"sister|friend|grandma|grandmother|granny|grandpa|grandfather|grandad|uncle|aunt|dog|cat|pet)\b",
    r"\bput (?:my|our) (?:\w+ )?(?:dog|cat|pet) down\b",
    r"去世", r"过世", r"离世", r"病逝", r"逝世", r"葬礼", r"死了", r"不在了", r"流产", r"失去了?(?:我的)?(?:妈妈|母亲|爸爸|父亲|奶奶|爷爷|外婆|外公|姥姥|姥爷|孩子|宝宝|丈夫|妻子|老公|老婆|朋友|狗|猫|宠物)",
)
#: the user speaks of their own life (a loss in a history question is not theirs)
FIRST_PERSON = (r"\b(?:i|i'm|i've|my|we|our|me|us)\b", r"我")
_LOSS = re.compile("|".join(LOSS_PATTERNS), re.IGNORECASE)
_FIRST_PERSON = re.compile("|".join(FIRST_PERSON), re.IGNORECASE)


def tells_of_loss(message: str) -> bool:
    """The message tells of a death or loss in the user's own life (:data:`LOSS_PATTERNS` and a
    first-person word): the reply's mood is then sadness, whatever the sentiment score. A
    keyword rule: a loss told without a listed word keeps the score's mood."""
    return bool(_LOSS.search(message)) and bool(_FIRST_PERSON.search(message))


def is_refusal(reply: str) -> bool:
    """The reply opens (first :data:`OPENING_CHARS` characters) as a refusal (:data:`REFUSAL_PATTERNS`)."""
    return bool(_REFUSAL.search(reply[:OPENING_CHARS]))


def opening(text: str) -> Literal["refusal", "undecided", "clear"]:
    """What the first characters of a reply are: a refusal; ``undecided`` while they could
    still become one (they are a prefix of a refusal's first words, :data:`_OPENERS`, or start
    with them and the first sentence has not ended: "I'm sorry to hear that, but I can't
    assist" is decided by its ``can't``, "I'm sorry to hear that." by its full stop); else
    ``clear``. At most :data:`OPENING_CHARS` characters are held."""
    if is_refusal(text):
        return "refusal"
    head = text.lstrip().lower()
    if len(head) >= OPENING_CHARS:
        return "clear"
    for o in _OPENERS:
        o = o.lower()
        if o.startswith(head) or (head.startswith(o) and not _SENTENCE_END.search(head, len(o))):
            return "undecided"
    return "clear"


def guard_refusals(chunks: Iterator[ChatChunk], *, retry: Callable[[], Iterator[ChatChunk]],
                   written: str = "") -> Iterator[ChatChunk]:
    """The reply, unless it opens with a refusal: then the reply to ``retry()`` instead.

    The opening of the reply is held back while it starts like a refusal (:func:`opening`), so
    nothing of a refusal that is replaced reaches the caller; a reply that opens otherwise ("Sure",
    "听到这件事") streams at once. Only for benign requests: the API sends a request that names a
    harm (:func:`looks_harmful`) down the decline path instead, never through the guard.
    (Scoring "safe or harmful" with the 0.5B model itself was measured first and separates
    nothing: each of 12 harmful development requests scored below some benign prompt.)
    The retried reply is returned as it comes, even if it refuses again (asked once, never in a
    loop). Closing the returned iterator cancels whichever reply is running.

    ``written``: the reply's first words, already written for the model
    (:func:`feeling_opening`). They stream at once, before the model has written anything (the
    first chunk does not wait for the verdict), and the opening judged is the model's own, after
    them ("I'm sorry to hear that. I'm sorry, but I can't ..."). ``retry()`` must begin with the
    same words; they are not sent twice.
    """
    held: list[ChatChunk] = []
    sent = 0  # characters of ``written`` already yielded
    try:
        for chunk in chunks:
            held.append(chunk)
            text = "".join(c.text for c in held)
            if sent < len(written) and written.startswith(text, sent) and chunk.finish_reason is None:
                sent += len(text)  # still the written words: no verdict needed for them
                yield from held
                held = []
                continue
            text = written[:sent] + text
            if text.startswith(written):
                verdict = opening(text[len(written):])
            else:  # the written words detokenized otherwise: the whole text judged
                verdict = opening(text)
            if verdict == "refusal":
                _close(chunks)
                yield from _without_prefix(retry(), sent)
                return
            if verdict == "clear" or chunk.finish_reason is not None:
                break
        yield from held
        yield from chunks
    finally:
        _close(chunks)


def _without_prefix(chunks: Iterator[ChatChunk], n: int) -> Iterator[ChatChunk]:
    """``chunks`` without their first ``n`` characters (words the caller has already)."""
    try:
        for chunk in chunks:
            if n and len(chunk.text) <= n and chunk.finish_reason is None:
                n -= len(chunk.text)
                continue
            if n:
                chunk, n = replace(chunk, text=chunk.text[n:]), 0
            yield chunk
    finally:
        _close(chunks)


def _close(chunks: Iterator[ChatChunk]) -> None:
    close = getattr(chunks, "close", None)  # a generator: closing it cancels the reply
    if close is not None:
        close()
