//! Facility registration: the fields a representative fills in, and the rules on them.
//!
//! A facility with a business registration number is approved as soon as the number's
//! check digit holds; one without stays pending until a local-government officer approves it.

use crate::ids::FacilityId;
use crate::time::UnixSeconds;
use serde::{Deserialize, Serialize};

/// A registration field was missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// The business number is not 10 digits.
    #[error(
        "business registration number {0:?} must be 10 digits (dashes allowed, e.g. 123-45-67891)"
    )]
    BusinessNumberFormat(String),
    /// The check digit does not match.
    #[error(
        "business registration number {0:?} fails its check digit: check it against the registration certificate"
    )]
    BusinessNumberCheckDigit(String),
    /// A free-text field is empty or too long.
    #[error("{field} must be 1 to {max} characters")]
    Field {
        /// Which field.
        field: &'static str,
        /// Its maximum length in characters.
        max: usize,
    },
    /// The category is not one of the known ones nor `other:<sub-category>`.
    #[error(
        "unknown category {0:?}: use one of {known} or other:<sub-category>",
        known = CATEGORIES.iter().map(|c| c.slug).collect::<Vec<_>>().join(", ")
    )]
    Category(String),
}

/// A checked Korean business registration number (사업자등록번호), kept as 10 digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BusinessNumber(String);

impl BusinessNumber {
    /// Parses `123-45-67891` or `1234567891` and checks the check digit.
    pub fn parse(s: &str) -> Result<Self, RegistrationError> {
        let digits: String = s.chars().filter(|c| *c != '-' && *c != ' ').collect();
        if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RegistrationError::BusinessNumberFormat(
                s.chars().take(40).collect(),
            ));
        }
        let d: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
        // The National Tax Service's weights; the ninth digit's product also adds its tens.
        const W: [u32; 9] = [1, 3, 7, 1, 3, 7, 1, 3, 5];
        let mut sum: u32 = d.iter().zip(W).map(|(a, w)| a * w).sum();
        sum += (d[8] * 5) / 10;
        let check = (10 - sum % 10) % 10;
        if check != d[9] {
            return Err(RegistrationError::BusinessNumberCheckDigit(
                s.chars().take(40).collect(),
            ));
        }
        Ok(BusinessNumber(digits))
    }

    /// The number as `123-45-67891`.
    pub fn formatted(&self) -> String {
        format!("{}-{}-{}", &self.0[..3], &self.0[3..5], &self.0[5..])
    }
}

impl TryFrom<String> for BusinessNumber {
    type Error = RegistrationError;
    fn try_from(s: String) -> Result<Self, RegistrationError> {
        BusinessNumber::parse(&s)
    }
}

impl From<BusinessNumber> for String {
    fn from(b: BusinessNumber) -> String {
        b.0
    }
}

/// A category of facility, and whether the 2020 rules made the log mandatory for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CategoryInfo {
    /// The machine name used on the command line.
    pub slug: &'static str,
    /// The Korean name from the guide.
    pub name_ko: &'static str,
    /// Mandatory nationwide (the 13 high-risk kinds) or only in the capital region.
    pub mandatory: Mandatory,
}

/// Where a category's log was mandatory under the guide of 2020-08-19.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mandatory {
    /// One of the high-risk facilities (고위험시설), everywhere.
    HighRisk,
    /// Capital region (Seoul, Incheon, Gyeonggi) only.
    CapitalRegion,
}

/// The categories of the guide's table (seed document, section 5).
pub const CATEGORIES: &[CategoryInfo] = &[
    CategoryInfo {
        slug: "hunting_pocha",
        name_ko: "헌팅포차",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "gamseong_pub",
        name_ko: "감성주점",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "nightclub",
        name_ko: "유흥주점(클럽, 룸살롱 등)",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "danran_bar",
        name_ko: "단란주점",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "colatec",
        name_ko: "콜라텍",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "karaoke",
        name_ko: "노래연습장",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "indoor_gx",
        name_ko: "실내집단운동(GX)",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "standing_venue",
        name_ko: "실내 스탠딩공연장",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "direct_sales",
        name_ko: "직접판매홍보관",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "logistics_center",
        name_ko: "유통 물류센터",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "large_academy",
        name_ko: "대형학원(300인 이상)",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "buffet",
        name_ko: "뷔페",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "pc_room",
        name_ko: "PC방",
        mandatory: Mandatory::HighRisk,
    },
    CategoryInfo {
        slug: "academy",
        name_ko: "학원",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "arcade",
        name_ko: "오락실",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "restaurant",
        name_ko: "일반음식점(150㎡ 이상)",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "waterpark",
        name_ko: "워터파크",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "religious",
        name_ko: "종교시설",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "wedding_hall",
        name_ko: "실내 결혼식장",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "performance_hall",
        name_ko: "공연장",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "cinema",
        name_ko: "영화관",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "bathhouse",
        name_ko: "목욕탕·사우나",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "indoor_sports",
        name_ko: "실내 체육시설",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "multi_room",
        name_ko: "멀티방·DVD방",
        mandatory: Mandatory::CapitalRegion,
    },
    CategoryInfo {
        slug: "funeral_hall",
        name_ko: "장례식장",
        mandatory: Mandatory::CapitalRegion,
    },
];

/// Checks a category: a known slug, or `other:<sub-category>` (1 to 60 characters).
pub fn parse_category(s: &str) -> Result<String, RegistrationError> {
    if CATEGORIES.iter().any(|c| c.slug == s) {
        return Ok(s.to_owned());
    }
    if let Some(sub) = s.strip_prefix("other:") {
        let n = sub.trim().chars().count();
        if (1..=60).contains(&n) {
            return Ok(format!("other:{}", sub.trim()));
        }
    }
    Err(RegistrationError::Category(s.chars().take(80).collect()))
}

/// Whether a facility may log visits yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FacilityStatus {
    /// Usable.
    Approved,
    /// Waiting for a local-government officer (registered without a business number).
    Pending,
}

impl FacilityStatus {
    /// The status as the CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            FacilityStatus::Approved => "approved",
            FacilityStatus::Pending => "pending",
        }
    }
}

/// What a representative submits to register one facility (or one branch of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Business name.
    pub name: String,
    /// `None` when the facility has no business number (then it needs approval).
    pub business_number: Option<BusinessNumber>,
    /// Representative's name.
    pub representative: String,
    /// Business phone.
    pub phone: String,
    /// A known category slug or `other:<sub-category>`.
    pub category: String,
    /// The jurisdiction (local government) it belongs to.
    pub region: String,
    /// Street address, detailed enough to tell branches apart.
    pub address: String,
}

fn field(name: &'static str, value: &str, max: usize) -> Result<(), RegistrationError> {
    let n = value.trim().chars().count();
    if n == 0 || n > max || value.chars().any(|c| c.is_control()) {
        return Err(RegistrationError::Field { field: name, max });
    }
    Ok(())
}

impl Registration {
    /// Checks every field; the business number was already checked when it was parsed.
    pub fn validate(&self) -> Result<(), RegistrationError> {
        field("name", &self.name, 100)?;
        field("representative", &self.representative, 60)?;
        field("phone", &self.phone, 20)?;
        field("region", &self.region, 60)?;
        field("address", &self.address, 200)?;
        parse_category(&self.category)?;
        Ok(())
    }

    /// The status a new registration starts in.
    pub fn initial_status(&self) -> FacilityStatus {
        if self.business_number.is_some() {
            FacilityStatus::Approved
        } else {
            FacilityStatus::Pending
        }
    }
}

/// A registered facility as the hub keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facility {
    /// Its id, also the partition key of its visits.
    pub id: FacilityId,
    /// What was registered.
    pub registration: Registration,
    /// Approval state.
    pub status: FacilityStatus,
    /// When it was registered.
    pub registered_at: UnixSeconds,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_number_check_digit() {
        // 123-45-67891: sum of weighted digits 1+6+21+4+15+42+7+24+45 = 165, plus 45/10 = 4,
        // so 169, check digit (10 - 9) % 10 = 1.
        assert!(BusinessNumber::parse("123-45-67891").is_ok());
        assert_eq!(
            BusinessNumber::parse("1234567890"),
            Err(RegistrationError::BusinessNumberCheckDigit(
                "1234567890".into()
            ))
        );
        assert!(matches!(
            BusinessNumber::parse("12-34"),
            Err(RegistrationError::BusinessNumberFormat(_))
        ));
        assert!(matches!(
            BusinessNumber::parse("12345678a1"),
            Err(RegistrationError::BusinessNumberFormat(_))
        ));
        assert_eq!(
            BusinessNumber::parse("1234567891").map(|b| b.formatted()),
            Ok("123-45-67891".to_owned())
        );
    }

    #[test]
    fn categories() {
        assert!(parse_category("karaoke").is_ok());
        assert_eq!(
            parse_category("other: 탁구장").as_deref(),
            Ok("other:탁구장")
        );
        assert!(parse_category("other:").is_err());
        assert!(parse_category("casino").is_err());
    }

    #[test]
    fn registration_fields() {
        let mut r = Registration {
            name: "노래방".into(),
            business_number: None,
            representative: "김".into(),
            phone: "02-123-4567".into(),
            category: "karaoke".into(),
            region: "mapo".into(),
            address: "1 Road".into(),
        };
        assert!(r.validate().is_ok());
        assert_eq!(r.initial_status(), FacilityStatus::Pending);
        r.name = " ".into();
        assert!(r.validate().is_err());
        r.name = "a\nb".into();
        assert!(r.validate().is_err());
    }
}
