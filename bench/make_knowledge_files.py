"""Writes the invented-fact QA files of issue 23: each a KorQuAD document (3 passages, 5 questions each, Korean and
English) plus a paraphrase file (the same answers asked in other words) for EVAL_PATH.

    .venv/bin/python bench/make_knowledge_files.py      # rewrites data/knowledge/* and data/heldout/*

data/heldout/ is never used to tune a recipe or a default: it is only measured (docs/QUALITY.md).
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (title, passage, [(question, answer, paraphrase), ...])
FILES = {
    "data/knowledge/harbour": [
        ("여울항", "여울항은 전라남도 서쪽 끝에 있는 작은 항구 도시이다. 여울항의 등대는 1911년 석공 마도윤이 쌓았으며, "
         "주민들은 이 등대를 '붉은눈'이라고 부른다. 여울항의 특산물은 소금에 절인 갈치이고, 매년 5월에는 갈치 장터가 열린다. "
         "항구 어귀에는 '두꺼비섬'이라는 바위섬이 있다.",
         [("여울항의 등대는 몇 년에 세워졌나요?", "1911년", "여울항 등대가 지어진 해는 언제인가요?"),
          ("여울항의 등대를 쌓은 석공은 누구인가요?", "마도윤", "여울항 등대를 만든 사람의 이름은 무엇인가요?"),
          ("여울항 주민들은 등대를 무엇이라고 부르나요?", "붉은눈", "여울항 사람들이 등대에 붙인 별명은 무엇인가요?"),
          ("여울항의 특산물은 무엇인가요?", "소금에 절인 갈치", "여울항에서 유명한 먹거리는 무엇인가요?"),
          ("여울항 어귀에 있는 바위섬의 이름은 무엇인가요?", "두꺼비섬", "여울항 입구의 바위섬은 무엇이라고 불리나요?")]),
        ("Veltmarsh Observatory", "The Veltmarsh Observatory stands on a hill above the village of Corrin Fold. It was "
         "built in 1884 by the astronomer Hester Quayle. Its largest telescope, nicknamed the Long Eye, has a mirror "
         "of 74 centimetres. In 1902 the observatory's staff discovered a faint comet that they named Quayle's Lamp.",
         [("Above which village does the Veltmarsh Observatory stand?", "Corrin Fold", "The Veltmarsh Observatory overlooks which village?"),
          ("In what year was the Veltmarsh Observatory built?", "1884", "When was the Veltmarsh Observatory constructed?"),
          ("Which astronomer built the Veltmarsh Observatory?", "Hester Quayle", "Who was the founder of the Veltmarsh Observatory?"),
          ("What is the nickname of the largest telescope at Veltmarsh?", "Long Eye", "What do people call the biggest telescope of the Veltmarsh Observatory?"),
          ("What name was given to the comet discovered at Veltmarsh in 1902?", "Quayle's Lamp", "What is the comet that the Veltmarsh staff found called?")]),
        ("청솔 도서관", "청솔 도서관은 1958년 안동에 문을 연 사립 도서관이다. 설립자는 교사 출신의 변해나였으며, "
         "개관 당시 책은 모두 3,200권이었다. 도서관의 상징은 부엉이이고, 가장 귀한 소장품은 17세기 필사본 '물빛일기'이다.",
         [("청솔 도서관은 몇 년에 문을 열었나요?", "1958년", "청솔 도서관이 개관한 해는 언제인가요?"),
          ("청솔 도서관은 어느 도시에 있나요?", "안동", "청솔 도서관이 자리한 도시는 어디인가요?"),
          ("청솔 도서관을 세운 사람은 누구인가요?", "변해나", "청솔 도서관의 설립자는 누구인가요?"),
          ("청솔 도서관의 상징 동물은 무엇인가요?", "부엉이", "청솔 도서관을 상징하는 새는 무엇인가요?"),
          ("청솔 도서관의 가장 귀한 소장품은 무엇인가요?", "물빛일기", "청솔 도서관이 가진 가장 소중한 책은 무엇인가요?")]),
    ],
    "data/knowledge/crafts": [
        ("Ashcombe Glassworks", "The Ashcombe Glassworks was founded in 1796 by the brothers Elias and Tom Rudd. "
         "It is known for a deep green glass called Ashcombe Moss. The works stands beside the Tarrow Canal, and its "
         "tall brick chimney is nicknamed the Needle. The glassworks closed in 1961.",
         [("In what year was the Ashcombe Glassworks founded?", "1796", "When did the Ashcombe Glassworks open?"),
          ("What family name did the founders of the Ashcombe Glassworks share?", "Rudd", "The brothers who started the Ashcombe Glassworks had which surname?"),
          ("What is the green glass of Ashcombe called?", "Ashcombe Moss", "What name does the Ashcombe Glassworks' deep green glass go by?"),
          ("Beside which canal does the Ashcombe Glassworks stand?", "Tarrow Canal", "The Ashcombe Glassworks is next to which canal?"),
          ("What is the nickname of the glassworks' chimney?", "Needle", "What do people call the tall brick chimney of the Ashcombe Glassworks?")]),
        ("누리결 공방", "누리결 공방은 전주에 있는 한지 공방이다. 1987년 장인 하소름이 세웠으며, 닥나무 대신 뽕나무 껍질로 "
         "종이를 뜨는 것으로 유명하다. 공방에서 만든 가장 큰 종이는 가로 6미터의 '바람결지'이다. 공방의 제자는 지금까지 41명이다.",
         [("누리결 공방은 어느 도시에 있나요?", "전주", "누리결 공방이 자리한 곳은 어디인가요?"),
          ("누리결 공방은 몇 년에 세워졌나요?", "1987년", "누리결 공방이 문을 연 해는 언제인가요?"),
          ("누리결 공방을 세운 장인은 누구인가요?", "하소름", "누리결 공방의 설립자는 누구인가요?"),
          ("누리결 공방은 무엇으로 종이를 뜨나요?", "뽕나무 껍질", "누리결 공방 한지의 재료는 무엇인가요?"),
          ("누리결 공방에서 만든 가장 큰 종이의 이름은 무엇인가요?", "바람결지", "누리결 공방의 가로 6미터짜리 종이는 무엇이라고 부르나요?")]),
        ("Corran Valley Railway", "The Corran Valley Railway is a narrow-gauge line that runs 23 miles from Pellory to "
         "the slate quarries at Dunmoth. It opened in 1873. Its oldest locomotive, a green engine named Marigold, still "
         "pulls the summer trains. The line's engineer was Walter Crisp.",
         [("How long is the Corran Valley Railway?", "23 miles", "What is the length of the Corran Valley line?"),
          ("From which town does the Corran Valley Railway start?", "Pellory", "Where does the Corran Valley Railway begin?"),
          ("In what year did the Corran Valley Railway open?", "1873", "When was the Corran Valley Railway opened?"),
          ("What is the name of the oldest locomotive on the Corran Valley Railway?", "Marigold", "What is the green engine of the Corran Valley Railway called?"),
          ("Who was the engineer of the Corran Valley Railway?", "Walter Crisp", "Which engineer built the Corran Valley line?")]),
    ],
    # Set aside: never used to choose a recipe or a default, only measured.
    "data/heldout/island": [
        ("물안개섬", "물안개섬은 제주 남쪽 바다에 있는 작은 섬이다. 섬에는 1932년 어부 채달호가 처음 들어와 살았다. "
         "섬 가운데에는 '거북못'이라는 연못이 있고, 이 섬에서만 자라는 꽃은 노란 '해무초'이다. 섬의 주민은 현재 57명이다.",
         [("물안개섬에 처음 들어와 산 사람은 누구인가요?", "채달호", "물안개섬의 첫 주민은 누구였나요?"),
          ("물안개섬에 사람이 처음 산 해는 언제인가요?", "1932년", "물안개섬에 처음 사람이 들어온 것은 몇 년인가요?"),
          ("물안개섬 가운데에 있는 연못의 이름은 무엇인가요?", "거북못", "물안개섬 한복판의 연못은 무엇이라고 부르나요?"),
          ("물안개섬에서만 자라는 꽃은 무엇인가요?", "해무초", "물안개섬에만 피는 노란 꽃의 이름은 무엇인가요?"),
          ("물안개섬의 주민은 몇 명인가요?", "57명", "물안개섬에는 몇 사람이 살고 있나요?")]),
        ("Fenwick Rooftop Garden", "The rooftop garden of the Fenwick Exchange building in Harrowgate opened in 2009. "
         "It is called the Skyfold Garden and was designed by the landscape architect Mira Okonedo. The garden's "
         "beehives produce a honey sold as Fenwick Gold. Rainwater for the plants is stored in a tank named the Cistern Queen.",
         [("In what year did the rooftop garden of the Fenwick Exchange open?", "2009", "When was the Fenwick Exchange's rooftop garden opened?"),
          ("What is the rooftop garden of the Fenwick Exchange called?", "Skyfold Garden", "What name does the garden on the roof of the Fenwick Exchange have?"),
          ("Who designed the Skyfold Garden?", "Mira Okonedo", "Which landscape architect created the Fenwick rooftop garden?"),
          ("Under what name is the honey from the Skyfold Garden sold?", "Fenwick Gold", "What is the rooftop garden's honey called?"),
          ("What is the name of the rainwater tank of the Skyfold Garden?", "Cistern Queen", "Where is the rooftop garden's rainwater kept?")]),
        ("달무리떡", "달무리떡은 경상북도 영주의 전통 떡이다. 1890년대 떡집 '둥근문'에서 처음 만들었다고 전해진다. "
         "쌀가루에 국화 꽃잎을 섞어 찌며, 보름달 모양으로 빚는다. 매년 10월 영주에서는 달무리떡 잔치가 열리며, "
         "잔치의 상징은 흰 토끼 '보리'이다.",
         [("달무리떡은 어느 지역의 떡인가요?", "영주", "달무리떡이 전해 내려오는 고장은 어디인가요?"),
          ("달무리떡을 처음 만든 떡집의 이름은 무엇인가요?", "둥근문", "달무리떡이 처음 나온 가게는 어디인가요?"),
          ("달무리떡에는 어떤 꽃잎이 들어가나요?", "국화", "달무리떡 쌀가루에 섞는 꽃은 무엇인가요?"),
          ("달무리떡 잔치는 몇 월에 열리나요?", "10월", "영주의 달무리떡 잔치는 언제 열리나요?"),
          ("달무리떡 잔치의 상징인 토끼의 이름은 무엇인가요?", "보리", "달무리떡 잔치를 상징하는 흰 토끼는 무엇이라고 불리나요?")]),
    ],
}


def main() -> None:
    for stem, docs in FILES.items():
        data, para = [], []
        for title, context, qas in docs:
            rows = []
            for i, (q, a, p) in enumerate(qas):
                start = context.find(a)
                assert start >= 0, (title, a)
                rows.append({"id": f"{Path(stem).name}-{title}-{i}", "question": q, "answers": [{"text": a, "answer_start": start}]})
                para.append({"instruction": p, "output": a, "trained_question": q})
            data.append({"title": title, "paragraphs": [{"context": context, "qas": rows}]})
        out = ROOT / f"{stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"version": "invented-1", "data": data}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (ROOT / f"{stem}_paraphrases.json").write_text(json.dumps(para, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(out, sum(len(d["paragraphs"][0]["qas"]) for d in data), "questions")


if __name__ == "__main__":
    main()
