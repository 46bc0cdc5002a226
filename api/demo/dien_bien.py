"""Điện Biên demo directory. Every facility here carries `is_demo = true`.

Names follow the province's real health network; addresses, phone numbers, coordinates,
doctors and personal IDs are illustrative. Prices are in VND and close to the 2025 public
price list (examination fees) or typical private-clinic prices.
"""

from __future__ import annotations

from typing import Any

WEEKDAYS = [{"weekday": d, "opens": "07:00", "closes": "17:00"} for d in range(1, 6)]
WEEKDAYS_AND_SATURDAY = [*WEEKDAYS, {"weekday": 6, "opens": "07:00", "closes": "11:30"}]
EVERY_DAY = [{"weekday": d, "opens": "07:00", "closes": "20:00"} for d in range(1, 8)]

HOSPITAL_SERVICES: list[dict[str, Any]] = [
    {"code": "KHAM-NOI", "name": "Khám nội tổng quát", "duration_minutes": 15, "price_vnd": 50_600},
    {"code": "KHAM-NHI", "name": "Khám nhi", "duration_minutes": 15, "price_vnd": 50_600},
    {"code": "TU-VAN-VIDEO", "name": "Tư vấn khám bệnh từ xa (video)", "duration_minutes": 20,
     "price_vnd": 100_000, "video_offered": True, "prepayment_required": True},
    {"code": "SIEU-AM", "name": "Siêu âm ổ bụng", "duration_minutes": 20, "price_vnd": 43_900},
    {"code": "XN-MAU", "name": "Xét nghiệm tổng phân tích tế bào máu", "duration_minutes": 10, "price_vnd": 46_200},
]
DISTRICT_SERVICES: list[dict[str, Any]] = [
    {"code": "KHAM-BENH", "name": "Khám bệnh đa khoa", "duration_minutes": 15, "price_vnd": 39_800},
    {"code": "KHAM-THAI", "name": "Khám thai", "duration_minutes": 20, "price_vnd": 39_800},
    {"code": "TIEM-CHUNG", "name": "Tiêm chủng mở rộng (buổi tiêm)", "duration_minutes": 10, "price_vnd": 0},
    {"code": "TU-VAN-VIDEO", "name": "Tư vấn khám bệnh từ xa (video)", "duration_minutes": 20,
     "price_vnd": 80_000, "video_offered": True, "prepayment_required": True},
]
COMMUNE_SERVICES: list[dict[str, Any]] = [
    {"code": "KHAM-BENH", "name": "Khám bệnh tại trạm", "duration_minutes": 15, "price_vnd": 34_500},
    {"code": "TIEM-CHUNG", "name": "Tiêm chủng mở rộng (buổi tiêm)", "duration_minutes": 10, "price_vnd": 0},
    {"code": "QUAN-LY-BENH", "name": "Quản lý bệnh mạn tính (tăng huyết áp, đái tháo đường)",
     "duration_minutes": 15, "price_vnd": 0},
]
CLINIC_SERVICES: list[dict[str, Any]] = [
    {"code": "KHAM-DV", "name": "Khám dịch vụ theo yêu cầu", "duration_minutes": 20, "price_vnd": 200_000,
     "prepayment_required": True},
    {"code": "TU-VAN-VIDEO", "name": "Tư vấn từ xa với bác sĩ (video)", "duration_minutes": 20,
     "price_vnd": 150_000, "video_offered": True, "prepayment_required": True},
    {"code": "SIEU-AM-4D", "name": "Siêu âm thai 4D", "duration_minutes": 30, "price_vnd": 350_000,
     "prepayment_required": True},
]


def _facility(code: str, name: str, kind: str, district: str, address: str, phone: str,
              lat: float, lon: float, hours: list[dict[str, Any]], services: list[dict[str, Any]]) -> dict[str, Any]:
    return {"code": code, "name": name, "kind": kind, "district": district, "address": address, "phone": phone,
            "latitude": lat, "longitude": lon, "opening_hours": hours, "services": services}


CITY = "Thành phố Điện Biên Phủ"

FACILITIES: list[dict[str, Any]] = [
    _facility("BVDK-DB", "Bệnh viện Đa khoa tỉnh Điện Biên", "provincial_hospital", CITY,
              "Phường Noong Bua, TP. Điện Biên Phủ", "0215 3825 350", 21.4046, 103.0328, EVERY_DAY, HOSPITAL_SERVICES),
    _facility("BV-SANNHI-DB", "Bệnh viện Sản Nhi tỉnh Điện Biên", "provincial_hospital", CITY,
              "Phường Thanh Trường, TP. Điện Biên Phủ", "0215 3826 115", 21.3731, 103.0222, EVERY_DAY,
              HOSPITAL_SERVICES),
    _facility("BV-YHCT-DB", "Bệnh viện Y học cổ truyền tỉnh Điện Biên", "provincial_hospital", CITY,
              "Phường Him Lam, TP. Điện Biên Phủ", "0215 3824 427", 21.3957, 103.0174, WEEKDAYS_AND_SATURDAY,
              HOSPITAL_SERVICES[:3]),
    _facility("BV-PHOI-DB", "Bệnh viện Phổi tỉnh Điện Biên", "provincial_hospital", CITY,
              "Phường Thanh Minh, TP. Điện Biên Phủ", "0215 3830 240", 21.3912, 103.0061, WEEKDAYS_AND_SATURDAY,
              HOSPITAL_SERVICES[:3]),
    _facility("CDC-DB", "Trung tâm Kiểm soát bệnh tật tỉnh Điện Biên", "specialist_centre", CITY,
              "Phường Tân Thanh, TP. Điện Biên Phủ", "0215 3825 601", 21.3849, 103.0203, WEEKDAYS,
              COMMUNE_SERVICES[1:2]),
    _facility("TTYT-DBP", "Trung tâm Y tế thành phố Điện Biên Phủ", "district_medical_centre", CITY,
              "Phường Mường Thanh, TP. Điện Biên Phủ", "0215 3825 220", 21.3868, 103.0152, EVERY_DAY,
              DISTRICT_SERVICES),
    _facility("TTYT-MUONGLAY", "Trung tâm Y tế thị xã Mường Lay", "district_medical_centre", "Thị xã Mường Lay",
              "Phường Na Lay, TX. Mường Lay", "0215 3852 115", 22.0386, 103.1527, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-DIENBIEN", "Trung tâm Y tế huyện Điện Biên", "district_medical_centre", "Điện Biên",
              "Xã Thanh Xương, huyện Điện Biên", "0215 3926 115", 21.3312, 103.0171, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-DBDONG", "Trung tâm Y tế huyện Điện Biên Đông", "district_medical_centre", "Điện Biên Đông",
              "Thị trấn Điện Biên Đông", "0215 3890 115", 21.2567, 103.2524, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-MUONGANG", "Trung tâm Y tế huyện Mường Ảng", "district_medical_centre", "Mường Ảng",
              "Thị trấn Mường Ảng", "0215 3880 115", 21.5128, 103.2172, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-TUANGIAO", "Trung tâm Y tế huyện Tuần Giáo", "district_medical_centre", "Tuần Giáo",
              "Thị trấn Tuần Giáo", "0215 3862 115", 21.5921, 103.4177, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-TUACHUA", "Trung tâm Y tế huyện Tủa Chùa", "district_medical_centre", "Tủa Chùa",
              "Thị trấn Tủa Chùa", "0215 3845 115", 21.8593, 103.3478, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-MUONGCHA", "Trung tâm Y tế huyện Mường Chà", "district_medical_centre", "Mường Chà",
              "Thị trấn Mường Chà", "0215 3841 115", 21.8006, 103.0583, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-MUONGNHE", "Trung tâm Y tế huyện Mường Nhé", "district_medical_centre", "Mường Nhé",
              "Xã Mường Nhé, huyện Mường Nhé", "0215 3740 115", 22.1843, 102.4580, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TTYT-NAMPO", "Trung tâm Y tế huyện Nậm Pồ", "district_medical_centre", "Nậm Pồ",
              "Xã Nà Hỳ, huyện Nậm Pồ", "0215 3750 115", 21.9412, 102.6876, EVERY_DAY, DISTRICT_SERVICES),
    _facility("TYT-HIMLAM", "Trạm Y tế phường Him Lam", "commune_station", CITY,
              "Phường Him Lam, TP. Điện Biên Phủ", "0215 3827 001", 21.3981, 103.0213, WEEKDAYS, COMMUNE_SERVICES),
    _facility("TYT-THANHXUONG", "Trạm Y tế xã Thanh Xương", "commune_station", "Điện Biên",
              "Xã Thanh Xương, huyện Điện Biên", "0215 3926 002", 21.3275, 103.0105, WEEKDAYS, COMMUNE_SERVICES),
    _facility("TYT-MUONGPHANG", "Trạm Y tế xã Mường Phăng", "commune_station", "Điện Biên",
              "Xã Mường Phăng, huyện Điện Biên", "0215 3926 003", 21.4449, 103.1324, WEEKDAYS, COMMUNE_SERVICES),
    _facility("TYT-QUAICANG", "Trạm Y tế xã Quài Cang", "commune_station", "Tuần Giáo",
              "Xã Quài Cang, huyện Tuần Giáo", "0215 3862 004", 21.5512, 103.3921, WEEKDAYS, COMMUNE_SERVICES),
    _facility("TYT-CHANUA", "Trạm Y tế xã Chà Nưa", "commune_station", "Nậm Pồ",
              "Xã Chà Nưa, huyện Nậm Pồ", "0215 3750 005", 21.8987, 102.8652, WEEKDAYS, COMMUNE_SERVICES),
    _facility("TYT-SINTHAU", "Trạm Y tế xã Sín Thầu", "commune_station", "Mường Nhé",
              "Xã Sín Thầu, huyện Mường Nhé", "0215 3740 006", 22.3968, 102.2349, WEEKDAYS, COMMUNE_SERVICES),
    _facility("PK-THANHHAI", "Phòng khám đa khoa Thanh Hải", "private_clinic", CITY,
              "Phường Tân Thanh, TP. Điện Biên Phủ", "0215 3811 888", 21.3843, 103.0189, EVERY_DAY, CLINIC_SERVICES),
    _facility("PK-BINHAN", "Phòng khám đa khoa Bình An", "private_clinic", CITY,
              "Phường Mường Thanh, TP. Điện Biên Phủ", "0215 3812 999", 21.3879, 103.0137, EVERY_DAY, CLINIC_SERVICES),
    _facility("PK-MINHGIANG", "Phòng khám Minh Giang", "private_clinic", CITY,
              "Phường Nam Thanh, TP. Điện Biên Phủ", "0215 3813 777", 21.3712, 103.0245, EVERY_DAY, CLINIC_SERVICES),
]

# (facility code, doctor code, name, title, specialties, languages, video, personal ID of the demo doctor)
DOCTORS: list[tuple[str, str, str, str, list[str], list[str], bool, str | None]] = [
    ("BVDK-DB", "BS-AN", "Nguyễn Văn An", "BSCKII", ["Nội tổng quát", "Tim mạch"], ["vi", "en"], True, "011080000101"),
    ("BVDK-DB", "BS-HUONG", "Quàng Thị Hương", "ThS.BS", ["Nội tiết"], ["vi", "Thái"], True, "011185000102"),
    ("BVDK-DB", "BS-THANG", "Lò Văn Thắng", "BSCKI", ["Ngoại tổng quát"], ["vi", "Thái"], False, None),
    ("BV-SANNHI-DB", "BS-MAI", "Vàng Thị Mai", "BSCKI", ["Nhi khoa"], ["vi", "H'Mông"], True, "011188000103"),
    ("BV-SANNHI-DB", "BS-LAN", "Trần Thị Lan", "BSCKII", ["Sản phụ khoa"], ["vi"], True, None),
    ("BV-YHCT-DB", "BS-DUC", "Phạm Minh Đức", "BS", ["Y học cổ truyền"], ["vi"], False, None),
    ("BV-PHOI-DB", "BS-TUAN", "Hoàng Anh Tuấn", "BSCKI", ["Hô hấp", "Lao"], ["vi"], True, None),
    ("TTYT-TUANGIAO", "BS-PAO", "Giàng A Páo", "BS", ["Đa khoa"], ["vi", "H'Mông"], True, "011087000104"),
    ("TTYT-DBP", "BS-HA", "Lê Thu Hà", "BS", ["Đa khoa", "Nhi khoa"], ["vi"], True, None),
    ("TTYT-MUONGNHE", "BS-SINH", "Sùng A Sinh", "YS", ["Đa khoa"], ["vi", "H'Mông"], False, None),
    ("TYT-HIMLAM", "YS-NGA", "Đỗ Thị Nga", "YS", ["Đa khoa"], ["vi"], False, None),
    ("PK-THANHHAI", "BS-HAI", "Nguyễn Thanh Hải", "BSCKII", ["Tim mạch"], ["vi", "en"], True, "011072000105"),
    ("PK-BINHAN", "BS-BINH", "Đặng Văn Bình", "BSCKI", ["Tai mũi họng"], ["vi"], True, None),
    ("PK-MINHGIANG", "BS-GIANG", "Lương Minh Giang", "BSCKI", ["Sản phụ khoa", "Siêu âm"], ["vi"], True, None),
]

# (personal ID, facility code, role): administrators and front-desk staff of the demo.
STAFF: list[tuple[str, str, str]] = [
    ("011078000201", "BVDK-DB", "admin"),
    ("011182000202", "BVDK-DB", "facility_staff"),
    ("011075000203", "PK-THANHHAI", "admin"),
    ("011179000204", "TTYT-TUANGIAO", "admin"),
]
