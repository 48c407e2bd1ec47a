"""Writes preference_sample.jsonl beside this file: the bundled DPO/ORPO demo pairs (issue 20).

Each question has a correct, concise answer (chosen) and, as rejected, either a wrong answer (every third
question) or a hedged, rambling one around the right answer. `kind` and `lang` are extra fields (ignored by the
pipeline) so results can be split by them.

    python3 data/sample/make_preference_sample.py
"""
import json
from pathlib import Path
EN = [
("What is the capital of Australia?", "Canberra.", "Sydney."),
("What is the capital of Canada?", "Ottawa.", "Toronto."),
("How many continents are there?", "Seven.", "Five."),
("What is the chemical symbol for gold?", "Au.", "Ag."),
("How many sides does a triangle have?", "Three.", "Four."),
("What is 5 times 6?", "30.", "35."),
("Who wrote Pride and Prejudice?", "Jane Austen.", "Emily Brontë."),
("How many minutes are in an hour?", "60.", "100."),
("What is the square root of 81?", "9.", "8."),
("What language is spoken in Brazil?", "Portuguese.", "Spanish."),
("What is the smallest prime number?", "2.", "1."),
("Which planet is closest to the Sun?", "Mercury.", "Venus."),
("How many players does a soccer team have on the field?", "Eleven.", "Nine."),
("What is the currency of Japan?", "The yen.", "The won."),
("What is the longest river in South America?", "The Amazon.", "The Nile."),
("Who was the first person to walk on the Moon?", "Neil Armstrong.", "Buzz Aldrin."),
("What is the hardest natural substance?", "Diamond.", "Gold."),
("What is 12 divided by 4?", "3.", "4."),
("Which organ pumps blood through the body?", "The heart.", "The liver."),
("What is the main language of Mexico?", "Spanish.", "Portuguese."),
("How many seconds are in a minute?", "60.", "100."),
("What is the capital of Egypt?", "Cairo.", "Alexandria."),
("Which gas do humans need to breathe?", "Oxygen.", "Nitrogen."),
("What is the largest country by area?", "Russia.", "China."),
("What shape has four equal sides and four right angles?", "A square.", "A triangle."),
("What is 9 plus 10?", "19.", "21."),
("In which country are the pyramids of Giza?", "Egypt.", "Mexico."),
("What is frozen water called?", "Ice.", "Steam."),
("How many wheels does a bicycle have?", "Two.", "Three."),
("Which season comes after winter?", "Spring.", "Autumn."),
("What is the capital of Thailand?", "Bangkok.", "Hanoi."),
("What colour do you get by mixing blue and yellow?", "Green.", "Purple."),
("Who developed the theory of relativity?", "Albert Einstein.", "Isaac Newton."),
("How many centimetres are in a metre?", "100.", "1000."),
("What is the largest organ of the human body?", "The skin.", "The liver."),
("What is the capital of Greece?", "Athens.", "Sparta."),
("What is the largest land animal?", "The African elephant.", "The giraffe."),
("How many letters are in the English alphabet?", "26.", "24."),
("What is 3 squared?", "9.", "6."),
("Which instrument has 88 keys?", "The piano.", "The guitar."),
("What is the capital of Portugal?", "Lisbon.", "Porto."),
("What do you call a baby cat?", "A kitten.", "A puppy."),
("How many days are in a leap year?", "366.", "365."),
("What is the capital of Norway?", "Oslo.", "Stockholm."),
("How many legs does an insect have?", "Six.", "Eight."),
("What is 100 minus 1?", "99.", "98."),
]
KO = [
("호주의 수도는 어디인가요?", "캔버라입니다.", "시드니입니다."),
("캐나다의 수도는 어디인가요?", "오타와입니다.", "토론토입니다."),
("1시간은 몇 분인가요?", "60분입니다.", "100분입니다."),
("삼각형의 변은 몇 개인가요?", "3개입니다.", "4개입니다."),
("5 곱하기 6은 얼마인가요?", "30입니다.", "35입니다."),
("브라질에서 쓰는 언어는 무엇인가요?", "포르투갈어입니다.", "스페인어입니다."),
("태양에 가장 가까운 행성은 무엇인가요?", "수성입니다.", "금성입니다."),
("일본의 화폐 단위는 무엇인가요?", "엔입니다.", "원입니다."),
("달에 처음 발을 디딘 사람은 누구인가요?", "닐 암스트롱입니다.", "버즈 올드린입니다."),
("가장 단단한 천연 물질은 무엇인가요?", "다이아몬드입니다.", "금입니다."),
("혈액을 온몸으로 보내는 기관은 무엇인가요?", "심장입니다.", "간입니다."),
("1분은 몇 초인가요?", "60초입니다.", "100초입니다."),
("이집트의 수도는 어디인가요?", "카이로입니다.", "알렉산드리아입니다."),
("면적이 가장 넓은 나라는 어디인가요?", "러시아입니다.", "중국입니다."),
("9 더하기 10은 얼마인가요?", "19입니다.", "21입니다."),
("물이 얼면 무엇이 되나요?", "얼음이 됩니다.", "수증기가 됩니다."),
("자전거의 바퀴는 몇 개인가요?", "2개입니다.", "3개입니다."),
("겨울 다음에 오는 계절은 무엇인가요?", "봄입니다.", "가을입니다."),
("파란색과 노란색을 섞으면 무슨 색이 되나요?", "초록색입니다.", "보라색입니다."),
("상대성 이론을 만든 과학자는 누구인가요?", "알베르트 아인슈타인입니다.", "아이작 뉴턴입니다."),
("1미터는 몇 센티미터인가요?", "100센티미터입니다.", "1000센티미터입니다."),
("그리스의 수도는 어디인가요?", "아테네입니다.", "스파르타입니다."),
("육지에서 가장 큰 동물은 무엇인가요?", "아프리카코끼리입니다.", "기린입니다."),
("3의 제곱은 얼마인가요?", "9입니다.", "6입니다."),
("건반이 88개인 악기는 무엇인가요?", "피아노입니다.", "기타입니다."),
("윤년은 며칠인가요?", "366일입니다.", "365일입니다."),
("대한민국의 국화는 무엇인가요?", "무궁화입니다.", "벚꽃입니다."),
("배추로 만드는 한국의 전통 발효 음식은 무엇인가요?", "김치입니다.", "불고기입니다."),
("부산은 어느 나라의 도시인가요?", "대한민국입니다.", "일본입니다."),
("사람의 심장은 몇 개인가요?", "1개입니다.", "2개입니다."),
("축구 경기에서 한 팀은 몇 명이 뛰나요?", "11명입니다.", "9명입니다."),
("가장 작은 소수는 무엇인가요?", "2입니다.", "1입니다."),
("태국의 수도는 어디인가요?", "방콕입니다.", "하노이입니다."),
("노르웨이의 수도는 어디인가요?", "오슬로입니다.", "스톡홀름입니다."),
("곤충의 다리는 몇 개인가요?", "6개입니다.", "8개입니다."),
("100 빼기 1은 얼마인가요?", "99입니다.", "98입니다."),
]
RAMBLE_EN = [
 "Well, there are many ways to look at it and opinions differ, but it is probably {a}, I think.",
 "Hmm, good question! It really depends on the context, but people often say {a}, though I'm not sure.",
 "That's a fascinating topic with a long history. It might be {a}, but you should check other sources.",
]
RAMBLE_KO = [
 "좋은 질문이네요! 여러 관점이 있지만 아마 {a}",
 "음, 상황에 따라 다르지만 보통 {a}",
 "흥미로운 주제네요. 확실하지는 않지만 {a}",
]
rows = []
for lang, facts, ramble in (("en", EN, RAMBLE_EN), ("ko", KO, RAMBLE_KO)):
    for i, (q, good, bad) in enumerate(facts):
        if i % 3 == 2:
            rej, kind = bad, "wrong"
        else:
            rej, kind = ramble[i % len(ramble)].format(a=good.rstrip(".") if lang == "en" else good), "rambling"
        rows.append({"prompt": q, "chosen": good, "rejected": rej, "kind": kind, "lang": lang})
with open(Path(__file__).with_name("preference_sample.jsonl"), "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(len(rows), sum(r["kind"]=="wrong" for r in rows))
